// The upload page. The picked files go up as one stream (each file after the one before, at
// the offset the server gives it) cut in chunks of the server's part size, so many small
// scans travel in a few large requests; a chunk's body is slices of the files it spans (a
// Blob of File slices: nothing is read into memory ahead). The server stores each chunk
// encrypted and durably before it answers, so after a dropped connection or a server
// restart the page only retries, and after a reload the server says which chunks it already
// has and only the rest are sent.
// Every word shown comes from the server, already in the patient's language (config.text).
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("config").textContent);
  if (config.state !== "upload") return; // a notice page (expired, used...): nothing to run

  const text = config.text;
  const byId = (id) => document.getElementById(id);
  const rtl = document.documentElement.dir === "rtl";
  const PARALLEL = 3; // chunks in flight: keeps a slow link busy without swamping a phone
  const pickers = [byId("pick-files"), byId("pick-folder")];
  let plan = []; // [{file, path, offset, size, bar}], in the stream's order
  let layout = 0; // the server's number for this file list: part of each chunk's address
  let partSize = 1;
  let total = 0; // the stream's length
  let have = new Set(); // chunk indexes the server holds
  const sending = new Map(); // chunk index -> bytes of it sent so far

  // -- words and numbers in the patient's language ------------------------------------------

  // Numbers and sizes inside right-to-left text keep their own order (as the bot's messages).
  const isolate = (value) => (rtl ? "\u2068" + value + "\u2069" : String(value));
  const fill = (template, values) =>
    template.replace(/\{(\w+)\}/g, (whole, name) => (name in values ? isolate(values[name]) : whole));
  const UNITS = [[1024 ** 3, "gigabyte"], [1024 ** 2, "megabyte"], [1024, "kilobyte"], [1, "byte"]];
  function size(bytes) {
    const [factor, unit] = UNITS.find(([f]) => bytes >= f) || UNITS[3];
    const format = new Intl.NumberFormat(config.lang, {
      style: "unit", unit, unitDisplay: "short", maximumFractionDigits: factor > 1 ? 1 : 0,
    });
    return format.format(bytes / factor);
  }
  const percent = (part, whole) =>
    new Intl.NumberFormat(config.lang, { style: "percent", maximumFractionDigits: 0 })
      .format(whole ? part / whole : 1);

  function notice(message, state) {
    const box = byId("notice");
    box.textContent = message || "";
    box.hidden = !message;
    if (state) document.body.dataset.state = state;
  }

  function refuse(reason) {
    byId("controls").hidden = true;
    notice(text[reason] || text.failed, "refused");
  }

  function enablePickers(on) {
    for (const input of pickers) {
      input.disabled = !on;
      input.parentElement.setAttribute("aria-disabled", String(!on));
    }
  }

  // -- who we are: the link's token, or Telegram's signed initData in the Mini App -----------

  let auth;
  if (config.mode === "link") {
    auth = "Bearer " + location.pathname.split("/").pop();
  } else {
    // Telegram opens a Mini App with its signed launch data in the URL fragment; kept for
    // the tab's life so a reload still works.
    const launched = new URLSearchParams(location.hash.slice(1)).get("tgWebAppData");
    if (launched) sessionStorage.setItem("tgWebAppData", launched);
    const initData = launched || sessionStorage.getItem("tgWebAppData");
    if (!initData) {
      refuse("open_in_telegram");
      return;
    }
    auth = "tma " + initData;
  }
  const query = config.case ? "?case=" + encodeURIComponent(config.case) : "";

  // -- talking to the server -----------------------------------------------------------------

  class Refused extends Error {
    constructor(reason) {
      super(reason);
      this.reason = reason;
    }
  }
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // XMLHttpRequest rather than fetch: it reports upload progress within a chunk.
  function send(method, path, body, onProgress) {
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open(method, config.api + path + query);
      xhr.setRequestHeader("Authorization", auth);
      let payload = null;
      if (body instanceof Blob) {
        xhr.setRequestHeader("Content-Type", "application/octet-stream");
        payload = body;
      } else if (body !== undefined) {
        xhr.setRequestHeader("Content-Type", "application/json");
        payload = JSON.stringify(body);
      }
      if (onProgress) xhr.upload.onprogress = (event) => onProgress(event.loaded);
      xhr.onload = () => resolve(xhr);
      xhr.onerror = xhr.ontimeout = xhr.onabort = () => resolve(null);
      xhr.timeout = 15 * 60 * 1000;
      xhr.send(payload);
    });
  }

  let retries = 0; // requests now waiting to retry: the notice says so while any are
  // Waits out anything that may pass (no connection, a restart, 5xx, 429); a refusal (4xx)
  // is final and shown.
  async function call(method, path, body, onProgress) {
    for (let attempt = 0; ; attempt++) {
      const xhr = await send(method, path, body, onProgress);
      if (xhr && xhr.status >= 200 && xhr.status < 300) {
        if (attempt > 0 && --retries === 0) notice(text.uploading);
        return JSON.parse(xhr.responseText || "{}");
      }
      if (xhr && xhr.status >= 400 && xhr.status < 500 && ![408, 429].includes(xhr.status)) {
        let reason = "failed";
        try {
          reason = JSON.parse(xhr.responseText).error || reason;
        } catch (error) {
          // not JSON: a proxy's page; "failed" it is
        }
        throw new Refused(reason);
      }
      if (attempt === 0 && retries++ === 0) notice(text.retrying);
      const wait = xhr && xhr.status === 429 ? 1000 * (Number(xhr.getResponseHeader("Retry-After")) || 2) : 0;
      await sleep(Math.max(wait, Math.min(500 * 2 ** attempt, 8000)));
    }
  }

  // -- progress --------------------------------------------------------------------------------

  const chunkCount = () => Math.ceil(total / partSize);
  const chunkLength = (index) => Math.min(partSize, total - index * partSize);
  // Bytes of the stream's stretch [begin, end) that the server holds or is receiving.
  function sent(begin, end) {
    let bytes = 0;
    for (let index = Math.floor(begin / partSize); index * partSize < end; index++) {
      const start = index * partSize;
      const done = have.has(index) ? chunkLength(index) : sending.get(index) || 0;
      bytes += Math.max(0, Math.min(end, start + done) - Math.max(begin, start));
    }
    return bytes;
  }

  let drawing = false;
  function redraw() {
    if (drawing) return;
    drawing = true;
    requestAnimationFrame(() => {
      drawing = false;
      const done = sent(0, total);
      let finished = 0;
      for (const item of plan) {
        const bytes = sent(item.offset, item.offset + item.size);
        finished += bytes === item.size ? 1 : 0;
        item.bar.value = item.size ? bytes : 1;
      }
      byId("overall").max = total || 1;
      byId("overall").value = total ? done : 1;
      byId("overall-text").textContent =
        fill(text.overall, { done: size(done), total: size(total) }) + " · " + percent(done, total);
      byId("files-text").textContent = fill(text.files, { done: finished, count: plan.length });
    });
  }

  function showFiles() {
    const list = byId("files");
    list.replaceChildren();
    for (const item of plan) {
      const row = document.createElement("li");
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = item.path; // text, never HTML
      item.bar = document.createElement("progress");
      item.bar.max = item.size || 1;
      row.append(name, item.bar);
      list.append(row);
    }
    byId("progress").hidden = false;
    redraw();
  }

  // -- the upload ----------------------------------------------------------------------------

  // Chunk `index` of the stream: slices of the files it spans.
  function chunkBody(index) {
    const begin = index * partSize;
    const end = begin + chunkLength(index);
    const slices = [];
    for (const item of plan) {
      if (item.offset >= end) break;
      if (item.offset + item.size <= begin) continue;
      slices.push(item.file.slice(Math.max(0, begin - item.offset), Math.min(item.size, end - item.offset)));
    }
    return new Blob(slices);
  }

  async function sendChunk(index) {
    await call("PUT", "chunks/" + layout + "/" + index, chunkBody(index), (loaded) => {
      sending.set(index, loaded);
      redraw();
    });
    sending.delete(index);
    have.add(index);
    redraw();
  }

  async function upload(picked) {
    if (!picked.length) {
      notice(text.empty);
      return;
    }
    enablePickers(false);
    notice(text.uploading, "uploading");
    const pathOf = (file) => file.webkitRelativePath || file.name;
    picked.sort((a, b) => (pathOf(a) < pathOf(b) ? -1 : pathOf(a) > pathOf(b) ? 1 : 0));
    try {
      const manifest = picked.map((file) => ({
        path: pathOf(file),
        size: file.size,
        type: file.type,
        modified: file.lastModified,
      }));
      // The server answers with the stream's layout: each file's offset in it (a file picked
      // twice is sent once), the part size and the chunks it already holds (a resume).
      const answer = await call("POST", "files", { files: manifest });
      ({ layout, part_size: partSize, total } = answer);
      have = new Set(answer.have);
      const seen = new Set();
      plan = [];
      answer.offsets.forEach((offset, i) => {
        // Two files with bytes at one offset are one file to the server: send it once.
        if (manifest[i].size) {
          if (seen.has(offset)) return;
          seen.add(offset);
        }
        plan.push({ file: picked[i], path: manifest[i].path, offset, size: manifest[i].size });
      });
      plan.sort((a, b) => a.offset - b.offset);
      showFiles();
      for (;;) {
        const queue = [];
        for (let index = 0; index < chunkCount(); index++) {
          if (!have.has(index)) queue.push(index);
        }
        const worker = async () => {
          while (queue.length) await sendChunk(queue.shift());
        };
        await Promise.all(Array.from({ length: PARALLEL }, worker));
        // The server may find a stored chunk damaged (after its machine crashed): then the
        // upload is open again and the chunks it lacks are sent once more.
        const finished = await call("POST", "finish", {});
        if (finished.state === "open") {
          for (const index of finished.missing) have.delete(index);
          notice(text.uploading, "uploading");
          continue;
        }
        if (await untilComplete()) return;
        byId("controls").hidden = false;
        notice(text.uploading, "uploading");
        const again = await call("POST", "files", { files: manifest });
        ({ layout } = again);
        have = new Set(again.have);
        redraw();
      }
    } catch (error) {
      refuse(error instanceof Refused ? error.reason : "failed");
    }
  }

  function complete() {
    byId("controls").hidden = true;
    sending.clear();
    for (let index = 0; index < chunkCount(); index++) have.add(index);
    if (plan.length) redraw();
    notice(text.done, "complete");
  }

  // The server hands the files to the bot's checks; the bot answers in the chat. True once
  // complete; false if the server found a stored chunk damaged and waits for it again.
  async function untilComplete() {
    byId("controls").hidden = true;
    notice(text.finishing, "finishing");
    for (;;) {
      const status = await call("GET", "status");
      if (status.state === "complete") {
        complete();
        return true;
      }
      if (status.state === "open") return false;
      await sleep(1500);
    }
  }

  async function begin() {
    enablePickers(false);
    try {
      let status = await call("GET", "status");
      if (status.state === "complete") return complete();
      if (status.state === "finishing") {
        if (await untilComplete()) return;
        // Open again (a damaged chunk): the files must be picked again to send it.
        byId("controls").hidden = false;
        status = await call("GET", "status");
      }
      if (status.total > 0) {
        // A reload: the browser forgot the files, the server kept their chunks.
        notice(fill(text.resume, { percent: percent(status.received, status.total) }));
      }
      for (const input of pickers) {
        input.addEventListener("change", () => upload(Array.from(input.files)));
      }
      enablePickers(true);
      document.body.dataset.state = "ready";
    } catch (error) {
      refuse(error instanceof Refused ? error.reason : "failed");
    }
  }

  begin();
})();

// The upload page. Files go up in chunks; the server stores each chunk encrypted and durably
// before it answers, so after a dropped connection or a server restart the page only retries,
// and after a reload the server says which chunks it already has and only the rest are sent.
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
  let partSize = config.part_size;
  let plan = []; // [{file, id, size, have: Set of chunk indexes, sending: Map index -> bytes}]

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

  const chunkCount = (item) => Math.ceil(item.size / partSize);
  const chunkLength = (item, index) => Math.min(partSize, item.size - index * partSize);
  function sent(item) {
    let bytes = 0;
    for (const index of item.have) bytes += chunkLength(item, index);
    for (const loaded of item.sending.values()) bytes += loaded;
    return Math.min(bytes, item.size);
  }

  let drawing = false;
  function redraw() {
    if (drawing) return;
    drawing = true;
    requestAnimationFrame(() => {
      drawing = false;
      let total = 0;
      let done = 0;
      let finished = 0;
      for (const item of plan) {
        const bytes = sent(item);
        total += item.size;
        done += bytes;
        finished += item.have.size === chunkCount(item) ? 1 : 0;
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

  async function sendChunk(item, index) {
    const begin = index * partSize;
    const blob = item.file.slice(begin, Math.min(item.size, begin + partSize));
    await call("PUT", "files/" + item.id + "/chunks/" + index, blob, (loaded) => {
      item.sending.set(index, loaded);
      redraw();
    });
    item.sending.delete(index);
    item.have.add(index);
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
      // The server answers per file sent: its id and the chunks it already holds (a resume).
      const answer = await call("POST", "files", { files: manifest });
      partSize = answer.part_size;
      const byFileId = new Map();
      answer.files.forEach((entry, i) => {
        if (!byFileId.has(entry.id)) {
          byFileId.set(entry.id, {
            file: picked[i], path: pathOf(picked[i]), id: entry.id, size: picked[i].size,
            have: new Set(entry.have), sending: new Map(),
          });
        }
      });
      plan = [...byFileId.values()];
      showFiles();
      const queue = [];
      for (const item of plan) {
        for (let index = 0; index < chunkCount(item); index++) {
          if (!item.have.has(index)) queue.push([item, index]);
        }
      }
      const worker = async () => {
        while (queue.length) {
          const [item, index] = queue.shift();
          await sendChunk(item, index);
        }
      };
      await Promise.all(Array.from({ length: PARALLEL }, worker));
      await call("POST", "finish", {});
      await untilComplete();
    } catch (error) {
      refuse(error instanceof Refused ? error.reason : "failed");
    }
  }

  function complete() {
    byId("controls").hidden = true;
    for (const item of plan) {
      item.sending.clear();
      for (let index = 0; index < chunkCount(item); index++) item.have.add(index);
    }
    if (plan.length) redraw();
    notice(text.done, "complete");
  }

  // The server hands the files to the bot's checks; the bot answers in the chat.
  async function untilComplete() {
    byId("controls").hidden = true;
    notice(text.finishing, "finishing");
    for (;;) {
      const status = await call("GET", "status");
      if (status.state === "complete") return complete();
      await sleep(1500);
    }
  }

  async function begin() {
    enablePickers(false);
    try {
      const status = await call("GET", "status");
      partSize = status.part_size;
      if (status.state === "complete") return complete();
      if (status.state === "finishing") return await untilComplete();
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

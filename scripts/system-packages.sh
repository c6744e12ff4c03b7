#!/usr/bin/env bash
# System packages the intake checks use: the Tesseract OCR engine with its English, Simplified
# Chinese, Thai and Russian data (photo legibility), and the fonts the legibility corpus renders
# pages with (tests/intake/legibility_corpus.py). Idempotent: installs only what is missing, and
# only as root with apt-get; otherwise it prints what to install and exits 0 (the checks then
# fall back to the fast screen and the legibility tests skip with a reason).
set -u

PACKAGES=(tesseract-ocr tesseract-ocr-eng tesseract-ocr-chi-sim tesseract-ocr-tha
  tesseract-ocr-rus fonts-noto-cjk fonts-thai-tlwg fonts-dejavu-core p7zip-full chromium curl)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
# Where dpkg is absent (not Debian), judge by the tools and data themselves.
if ! command -v dpkg-query >/dev/null 2>&1; then
  missing=()
  command -v tesseract >/dev/null 2>&1 || missing+=(tesseract-ocr)
  if command -v tesseract >/dev/null 2>&1; then
    langs="$(tesseract --list-langs 2>/dev/null)"
    for lang in eng chi_sim tha rus; do
      grep -qx "$lang" <<<"$langs" || missing+=("tesseract-ocr-${lang//_/-}")
    done
  fi
fi

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update >/dev/null 2>&1 || true
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
      echo "could not install: ${missing[*]} (photo legibility falls back to the fast screen)"
  fi
else
  echo "missing system packages (install as root): apt-get install ${missing[*]}"
fi
exit 0

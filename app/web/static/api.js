// Talking to the API from the page: the API key (asked for once, kept in localStorage, sent as
// Bearer, and as ?access_token= where a browser cannot set headers: EventSource), problem+json
// errors, and images that need the key (fetched as blobs).
"use strict";

class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem && (problem.detail || problem.title);
    super(detail ? `${detail} (HTTP ${status})` : `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

const Surf = (() => {
  const root = document.body.dataset.root || "";
  const STORAGE = "surfing.apiKey";
  let asking = null; // one key dialog at a time, however many requests got a 401
  let declined = false; // the user closed the dialog without a key: ask again only on a click

  const key = () => localStorage.getItem(STORAGE) || "";
  const url = (path) => root + path;

  function setKey(value) {
    if (value) localStorage.setItem(STORAGE, value);
    else localStorage.removeItem(STORAGE);
    showAuth();
  }

  function showAuth() {
    const el = document.getElementById("auth-state");
    if (!el) return;
    const k = key();
    el.textContent = k ? `key …${k.slice(-4)}` : declined ? "no key: set one" : "";
    el.title = k || declined ? "the API key this page sends; click to change it" : "";
    el.classList.toggle("link", !!k || declined);
  }

  function askKey(message) {
    if (asking) return asking;
    const dialog = document.getElementById("key-dialog");
    const input = document.getElementById("api-key");
    document.getElementById("key-message").textContent = message || "";
    input.value = key();
    asking = new Promise((resolve) => {
      dialog.onclose = () => {
        asking = null;
        if (dialog.returnValue === "save" && input.value.trim()) setKey(input.value.trim());
        declined = !key();
        showAuth();
        resolve(key());
      };
    });
    dialog.returnValue = ""; // Escape keeps the last value: start clean
    dialog.showModal();
    return asking;
  }

  async function request(path, options = {}, retry = true) {
    const headers = Object.assign({}, options.headers || {});
    const k = key();
    if (k) headers.Authorization = `Bearer ${k}`;
    const response = await fetch(url(path), Object.assign({}, options, { headers }));
    if (response.status === 401 && retry && !declined) {
      const problem = await response.clone().json().catch(() => null);
      const detail = (problem && problem.detail) || "This API needs a key.";
      await askKey(k ? `The stored key was refused: ${detail}` : detail);
      return request(path, options, false);
    }
    return response;
  }

  async function json(path, options) {
    const response = await request(path, options);
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  // An <img> for a URL behind the key: a blob URL when a key is set, else the URL itself (so
  // the browser's cache and right-click "open image" keep working without auth).
  async function image(img, path) {
    if (!key()) {
      img.src = url(path);
      await img.decode().catch(() => {
        throw new ApiError(404, { detail: `${path} could not be loaded` });
      });
      return;
    }
    const response = await request(path);
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    if (img.dataset.blob) URL.revokeObjectURL(img.dataset.blob);
    img.src = img.dataset.blob = URL.createObjectURL(await response.blob());
    await img.decode().catch(() => {});
  }

  // Download a URL behind the key under a file name (plain links cannot send headers).
  async function download(path, filename) {
    const response = await request(path);
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await response.blob());
    a.download = filename;
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  function eventsUrl(path) {
    const k = key();
    return url(path) + (k ? `?access_token=${encodeURIComponent(k)}` : "");
  }

  document.addEventListener("DOMContentLoaded", () => {
    const el = document.getElementById("auth-state");
    if (el) {
      el.addEventListener("click", () => {
        if (!key() && !declined) return;
        askKey("Change or clear the key.").then((k) => { if (k) location.reload(); });
      });
    }
    showAuth();
  });

  return { root, url, key, setKey, askKey, request, json, image, download, eventsUrl, showAuth };
})();

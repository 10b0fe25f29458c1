// The console's only script: live pages, and a confirmation before a destructive form.
// A page marked data-live follows /events (server-sent events) and fetches itself again
// when a conversation it shows changes; nothing is built from event data in the page.
"use strict";

let asked = 0; // refreshes started
let shown = 0; // the newest one applied

function refresh() {
  const mine = ++asked;
  fetch(window.location.href, { credentials: "same-origin", headers: { "X-Live": "1" } })
    .then((response) => (response.ok ? response.text() : null))
    .then((html) => {
      // An older answer arriving after a newer one is not shown.
      if (html === null || mine < shown) return;
      shown = mine;
      const fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
      const main = document.getElementById("main");
      if (!fresh) return;
      // Keep what an operator has typed (a draft answer, a reason), and where.
      const drafts = new Map();
      main.querySelectorAll("textarea, input[type=text], input[type=search]").forEach((field) => {
        if (field.value) drafts.set(fieldKey(field), field.value);
      });
      const focused = document.activeElement && main.contains(document.activeElement)
        ? fieldKey(document.activeElement) : null;
      main.replaceWith(fresh);
      fresh.querySelectorAll("textarea, input[type=text], input[type=search]").forEach((field) => {
        const key = fieldKey(field);
        if (drafts.has(key)) field.value = drafts.get(key);
        if (key === focused) field.focus();
      });
      wire(fresh);
    })
    .catch(() => {});
}

// A form field's identity across refreshes: its form's action and hidden values, and
// its name.
function fieldKey(field) {
  const form = field.form;
  const hidden = form
    ? Array.from(form.querySelectorAll("input[type=hidden]"))
      .filter((h) => h.name !== "csrf" && h.name !== "nonce")
      .map((h) => h.name + "=" + h.value).join("&")
    : "";
  return (form ? form.getAttribute("action") : "") + "?" + hidden + "#" + field.name;
}

function wire(root) {
  root.querySelectorAll("form.confirm").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm || "Sure?")) event.preventDefault();
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const main = document.getElementById("main");
  wire(main);
  const live = main.dataset.live;
  if (!live) return;
  const url = live === "all" ? "/events" : "/events?conversation=" + encodeURIComponent(live);
  const source = new EventSource(url);
  // Many changes at once (a busy platform) make one refresh, at most a second after the
  // first of them, and always after the last: a conversation's events are stored
  // between two changes of its record.
  let timer = null;
  let first = 0;
  function schedule() {
    const now = Date.now();
    if (timer === null) first = now;
    else clearTimeout(timer);
    const wait = Math.max(0, Math.min(300, first + 1000 - now));
    timer = setTimeout(() => { timer = null; refresh(); }, wait);
  }
  source.addEventListener("change", schedule);
  // Connected (again): what changed since the page was made (or while cut off) shows.
  source.addEventListener("open", schedule);
});

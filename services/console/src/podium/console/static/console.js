// The console's only script: live pages, and a confirmation before a destructive form.
// A page marked data-live follows /events (server-sent events) and fetches itself again
// when a conversation it shows changes; nothing is built from event data in the page.
"use strict";

function refresh() {
  fetch(window.location.href, { credentials: "same-origin", headers: { "X-Live": "1" } })
    .then((response) => (response.ok ? response.text() : null))
    .then((html) => {
      if (html === null) return;
      const fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
      const main = document.getElementById("main");
      // Keep what an operator is typing.
      const typing = document.activeElement && main.contains(document.activeElement)
        && document.activeElement.tagName === "TEXTAREA" && document.activeElement.value;
      if (fresh && !typing) {
        main.replaceWith(fresh);
        wire(fresh);
      }
    })
    .catch(() => {});
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
  let pending = null;
  source.addEventListener("change", () => {
    // Many changes at once (a busy platform) make one refresh.
    if (pending) return;
    pending = setTimeout(() => { pending = null; refresh(); }, 300);
  });
});

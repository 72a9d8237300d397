// The console: sign-in, the hash router, and the pages (each a module with `render(view, route)`).

import { api, apiKey, forgetImages, setApiKey, whenUnauthorized } from "./api.js";
import { add, clear, errorBox, field, h, pageTitle } from "./ui.js";
import * as faces from "./pages/faces.js";
import * as generate from "./pages/generate.js";
import * as jobs from "./pages/jobs.js";
import * as models from "./pages/models.js";
import * as train from "./pages/train.js";
import * as tryPage from "./pages/try.js";

// "#/section/arg?x=1" -> page. Each entry: section -> (route) -> render function.
const ROUTES = {
  try: tryPage.render,
  faces: faces.render,
  train: train.render,
  generate: generate.render,
  gallery: generate.renderGallery,
  image: generate.renderImage,
  jobs: jobs.render,
  job: jobs.renderJob,
  models: models.render,
};
const TITLES = {
  try: "Try", faces: "Faces", train: "Train", generate: "Generate", gallery: "Gallery", image: "Image",
  jobs: "Jobs", job: "Job", models: "Models",
};

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");
let current = null; // the AbortController of the page on screen: aborting it stops its streams and polls

export function parseRoute(hash) {
  const text = hash.replace(/^#\/?/, "");
  const [path, search = ""] = text.split("?");
  const [section = "", ...args] = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { section: section || "try", args, query: new URLSearchParams(search) };
}

export function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function route() {
  if (current) current.abort();
  current = new AbortController();
  if (!apiKey()) {
    showSignIn();
    return;
  }
  const where = parseRoute(location.hash);
  const render = ROUTES[where.section];
  nav.hidden = false;
  signOutButton.hidden = false;
  const section = where.section === "image" ? "gallery" : where.section === "job" ? "jobs" : where.section;
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const view = h("div", { class: "view", dataset: { page: where.section } });
  clear(main, view);
  document.title = `${TITLES[where.section] || "Not found"} · Percept console`;
  if (!render) {
    add(view, pageTitle("Not found"), h("p", {}, "No such page. ", h("a", { href: "#/try" }, "Go to Try.")));
  } else {
    try {
      const done = render(view, { ...where, signal: current.signal, navigate });
      if (done && done.catch) done.catch((error) => { if (error.name !== "AbortError") add(view, errorBox(error)); });
    } catch (error) {
      add(view, errorBox(error));
    }
  }
  // Move focus to the new page's heading, so keyboard and screen-reader users start there.
  const heading = view.querySelector("h1");
  if (heading) heading.focus({ preventScroll: true });
  window.scrollTo(0, 0);
}

function showSignIn(message) {
  nav.hidden = true;
  signOutButton.hidden = true;
  document.title = "Sign in · Percept console";
  const input = h("input", { type: "password", name: "key", autocomplete: "off", required: true, spellcheck: "false" });
  const status = h("div", { role: "status", "aria-live": "polite", class: "sign-in-status" });
  const form = h("form", { class: "sign-in card", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title", tabindex: "-1" }, "Sign in"),
    h("p", {}, "Paste an API key (", h("code", {}, "percept keys create NAME"), " prints one; ",
      h("code", {}, "make run"), " prints a dev key). It is kept in this tab only and sent as ",
      h("code", {}, "Authorization: Bearer"), " with every API call."),
    field("API key", input),
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    status);
  if (message) add(status, errorBox(message));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    setApiKey(key);
    clear(status, h("p", { class: "busy" }, "Checking the key…"));
    try {
      await api("/v1/models");
      if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/try";
      else route();
    } catch (error) {
      setApiKey(null);
      clear(status, errorBox(error.status === 401 ? new Error("That key was not accepted (401). Check it and try again.") : error));
      input.focus();
    }
  });
  clear(main, form);
  input.focus();
}

function signOut() {
  setApiKey(null);
  forgetImages();
  if (current) current.abort();
  showSignIn();
}

whenUnauthorized(() => {
  // The key stopped working (revoked): back to the sign-in form, saying why. (The sign-in form's own check
  // reports a wrong key itself.)
  if (nav.hidden) return;
  setApiKey(null);
  if (current) current.abort();
  showSignIn(new Error("The API no longer accepts this key (401); sign in again."));
});

signOutButton.addEventListener("click", signOut);
document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  (main.querySelector("h1") || main).focus();
});
window.addEventListener("hashchange", route);
route();

// Every page: the Menu button that folds the main navigation on narrow screens. Without
// this script the links simply stay open (tessera.css hides them only under .js).
(function () {
  "use strict";
  var toggle = document.querySelector(".nav-toggle");
  var menu = toggle && document.getElementById(toggle.getAttribute("aria-controls"));
  if (!menu) return;
  toggle.hidden = false;

  function set(open) {
    menu.classList.toggle("open", open);
    toggle.setAttribute("aria-expanded", open ? "true" : "false");
  }

  toggle.addEventListener("click", function () {
    set(toggle.getAttribute("aria-expanded") !== "true");
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && toggle.getAttribute("aria-expanded") === "true") {
      set(false);
      toggle.focus();
    }
  });
})();

// Roony dashboard enhancements. Every page works without this file.
// Forms with data-confirm ask before submitting (freeze, rotate, disconnect, deny).
document.addEventListener("submit", function (e) {
  var form = e.target;
  var msg = form && form.getAttribute && form.getAttribute("data-confirm");
  if (msg && !window.confirm(msg)) { e.preventDefault(); }
}, true);

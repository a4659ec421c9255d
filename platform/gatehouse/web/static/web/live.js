// Progressive enhancement: parts marked data-live refresh themselves while a training run is in progress.
// Without JavaScript the page is complete; it is just not updated until reloaded.
(function () {
  const parts = document.querySelectorAll("[data-live]");
  if (!parts.length) return;
  setInterval(async function () {
    const response = await fetch(window.location.href, {headers: {"X-Requested-With": "fetch"}});
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    parts.forEach(function (part) {
      const next = fresh.getElementById(part.id);
      if (next) part.innerHTML = next.innerHTML;
    });
  }, 5000);
})();

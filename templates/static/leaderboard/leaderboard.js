// The leaderboard's history charts, drawn with the vendored uPlot from the JSON the page
// embeds. The same figures are in the table under each chart, so without scripts (or if
// this fails) nothing is lost.
(function () {
  "use strict";
  var source = document.getElementById("leaderboard-history");
  if (!source || typeof uPlot === "undefined") return;
  var history = JSON.parse(source.textContent);
  var lines = [
    { key: "routed", label: "Mixture (routed)", stroke: "#2f5bd3", width: 3 },
    { key: "base", label: "Base model", stroke: "#5b6475", width: 2 },
    { key: "best_single", label: "Best single adapter", stroke: "#1e7a3c", width: 2 },
    { key: "oracle", label: "Oracle routing", stroke: "#8a5a00", width: 2, dash: [6, 4] },
  ];
  var charts = [];

  function widthOf(element) {
    return Math.max(240, Math.floor(element.getBoundingClientRect().width));
  }

  function heightFor(width) {
    return width < 500 ? 220 : 300;
  }

  function fmt(value) {
    return value == null ? "–" : value.toFixed(3);
  }

  document.querySelectorAll(".lb-chart[data-series]").forEach(function (element) {
    var series = history[Number(element.dataset.series)];
    if (!series || !series.mixtures.length) return;
    var width = widthOf(element);
    var options = {
      width: width,
      height: heightFor(width),
      scales: { x: { time: false }, y: { range: [0, 1] } },
      axes: [
        {
          label: "Mixture version",
          // Mixture numbers are whole: no ticks between them.
          incrs: [1, 2, 5, 10, 20, 50, 100],
          values: function (u, ticks) {
            return ticks.map(function (t) { return "v" + t; });
          },
        },
        { label: "Score", values: function (u, ticks) { return ticks.map(fmt); } },
      ],
      series: [{ label: "Mixture", value: function (u, v) { return v == null ? "–" : "v" + v; } }]
        .concat(lines.map(function (line) {
          return {
            label: line.label,
            stroke: line.stroke,
            width: line.width,
            dash: line.dash,
            points: { show: true, size: 7, fill: line.stroke },
            spanGaps: false,
            value: function (u, v) { return fmt(v); },
          };
        })),
    };
    var data = [series.mixtures].concat(lines.map(function (line) { return series[line.key]; }));
    charts.push({ element: element, plot: new uPlot(options, data, element) });
  });

  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(function () {
      charts.forEach(function (chart) {
        var width = widthOf(chart.element);
        chart.plot.setSize({ width: width, height: heightFor(width) });
      });
    }, 150);
  });
})();

// What every page of the browser tests is checked for (tests/browser/conftest.py's audit):
// one <h1>, headings without skipped levels, landmarks, a skip link to the main content, a
// name for every form control and image, and text contrast of at least WCAG AA (4.5:1, or
// 3:1 for large text) against the colours painted under it. Returns the problems in words.
() => {
  const problems = [];
  const says = (el) => {
    const text = (el.innerText || el.textContent || "").trim().replace(/\s+/g, " ");
    const id = el.id ? "#" + el.id : "";
    const cls = el.className && typeof el.className === "string"
      ? "." + el.className.trim().split(/\s+/).join(".") : "";
    return `<${el.tagName.toLowerCase()}${id}${cls}> "${text.slice(0, 50)}"`;
  };
  const shown = (el) => {
    const style = getComputedStyle(el);
    if (style.display === "none" || style.visibility === "hidden") return false;
    if (el.closest("details:not([open]) > :not(summary)")) return false;
    const box = el.getBoundingClientRect();
    return box.width > 1 && box.height > 1;
  };

  // Headings: exactly one h1, first; no level skipped on the way down.
  const headings = [...document.querySelectorAll("h1, h2, h3, h4, h5, h6")];
  const h1s = headings.filter((h) => h.tagName === "H1");
  if (h1s.length !== 1) problems.push(`${h1s.length} <h1> elements`);
  let level = 0;
  for (const h of headings) {
    const next = Number(h.tagName[1]);
    if (next > level + 1) problems.push(`heading skips from h${level} to h${next}: ${says(h)}`);
    level = next;
  }

  // Landmarks and the skip link.
  if (document.querySelectorAll("main").length !== 1) problems.push("not exactly one <main>");
  if (!document.querySelector("header nav[aria-label]")) problems.push("no labelled <nav> in the header");
  if (!document.querySelector("footer")) problems.push("no <footer>");
  const skip = document.querySelector("a.skip-link");
  const target = skip && document.querySelector(skip.getAttribute("href"));
  if (!skip || !target || target.tagName !== "MAIN") problems.push("no skip link to <main>");
  if (!document.documentElement.lang) problems.push("no lang on <html>");
  if (!document.title.trim()) problems.push("no <title>");

  // Every form control has a name a screen reader can say.
  const named = (el) => {
    if ((el.getAttribute("aria-label") || "").trim()) return true;
    const ids = (el.getAttribute("aria-labelledby") || "").split(/\s+/).filter(Boolean);
    if (ids.some((id) => (document.getElementById(id)?.textContent || "").trim())) return true;
    if ([...(el.labels || [])].some((label) => label.textContent.trim())) return true;
    if (el.tagName === "BUTTON") return el.textContent.trim() !== "";
    if (["submit", "button", "reset"].includes(el.type)) return (el.value || "").trim() !== "";
    return (el.getAttribute("title") || "").trim() !== "";
  };
  for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea, button")) {
    if (!named(el)) problems.push(`form control without a label: ${says(el)} name=${el.name}`);
  }
  for (const img of document.querySelectorAll("img:not([alt])")) problems.push(`image without alt: ${img.src}`);
  for (const el of document.querySelectorAll("[role=img]:not([aria-label]):not([aria-labelledby])")) {
    problems.push(`role=img without a name: ${says(el)}`);
  }

  // Contrast of every piece of visible text against what is painted under it.
  const rgba = (value) => {
    const n = (value.match(/[\d.]+/g) || []).map(Number);
    return n.length < 3 ? [0, 0, 0, 0] : [n[0], n[1], n[2], n.length > 3 ? n[3] : 1];
  };
  const over = (top, under) => {
    const a = top[3];
    return [0, 1, 2].map((i) => top[i] * a + under[i] * (1 - a)).concat(1);
  };
  const background = (el) => {
    const layers = [];
    for (let node = el; node && node.nodeType === 1; node = node.parentElement) {
      const style = getComputedStyle(node);
      if (style.backgroundImage !== "none") return null;  // cannot tell what is under it
      const colour = rgba(style.backgroundColor);
      if (colour[3] > 0) layers.push(colour);
      if (colour[3] === 1) break;
    }
    return layers.reverse().reduce((under, top) => over(top, under), [255, 255, 255, 1]);
  };
  const luminance = (c) => {
    const [r, g, b] = c.slice(0, 3).map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const seen = new Set();
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let text = walker.nextNode(); text; text = walker.nextNode()) {
    const el = text.parentElement;
    if (!text.textContent.trim() || !el || seen.has(el)) continue;
    seen.add(el);
    if (el.closest("script, style, noscript, option, .visually-hidden, .skip-link") || !shown(el)) continue;
    const style = getComputedStyle(el);
    const under = background(el);
    if (under === null) continue;
    const fg = over(rgba(style.color), under);
    const [hi, lo] = [luminance(fg), luminance(under)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    if (ratio < (large ? 3 : 4.5) - 0.005) {
      problems.push(`contrast ${ratio.toFixed(2)}:1 (${style.color} on rgb(${under.slice(0, 3).map(Math.round)})): ${says(el)}`);
    }
  }
  return problems;
}

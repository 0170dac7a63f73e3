/* The playground: send the form to the portal's relay and show the answer as its
   server-sent events arrive. Without this script the form posts and the page comes back
   with the whole answer. No key is ever here: the portal adds it on its side. */
(function () {
  "use strict";

  var form = document.getElementById("playground-form");
  if (!form || !window.fetch || !window.ReadableStream || !window.TextDecoder) {
    return; // the plain form still works
  }
  var answer = document.getElementById("playground-answer");
  var errorBox = document.getElementById("playground-error");
  var statusLine = document.getElementById("playground-status");
  var attributionBox = document.getElementById("playground-attribution");
  var send = document.getElementById("playground-send");
  var stop = document.getElementById("playground-stop");
  var controller = null;

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) { node.setAttribute(name, attrs[name]); });
    (children || []).forEach(function (child) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function fixed(value) {
    return typeof value === "number" ? value.toFixed(3) : null;
  }

  function showError(message) {
    errorBox.replaceChildren(el("p", { "class": "alert alert-error" }, [message]));
  }

  // The same markup as templates/routing/_playground_attribution.html.
  function showAttribution(info, usage) {
    var facts = el("dl", { "class": "facts" }, [
      el("dt", {}, ["Router"]),
      el("dd", {}, [el("code", {}, [String(info.router)]), " ",
        el("span", { "class": "muted" }, ["(" + info.reason +
          (info.threshold !== null && info.threshold !== undefined ? ", threshold " + info.threshold : "") + ")"])]),
      el("dt", {}, ["Composition"]),
      el("dd", {}, [el("code", {}, [String(info.composition.method)]),
        info.composition.k ? " k = " + info.composition.k : ""]),
      el("dt", {}, ["Mixture"]),
      el("dd", {}, ["version " + info.mixture]),
    ]);
    if (usage) {
      facts.appendChild(el("dt", {}, ["Tokens"]));
      facts.appendChild(el("dd", {}, [usage.prompt_tokens + " prompt + " + usage.completion_tokens + " answer"]));
    }
    var parts = [facts];
    if (info.adapters.length) {
      var rows = info.adapters.map(function (a) {
        var meter = el("meter", { min: "0", max: "1", value: String(a.weight), "aria-hidden": "true" });
        return el("tr", {}, [
          el("th", { scope: "row" }, [el("code", {}, [a.id]), " ",
            el("span", { "class": "muted" }, ["v" + a.version + " · " + a.title])]),
          el("td", {}, [a.contributor]),
          el("td", {}, [meter, " " + fixed(a.weight)]),
          el("td", {}, [fixed(a.score) || "none"]),
        ]);
      });
      parts.push(el("div", { "class": "table-wrap" }, [el("table", { "class": "playground-adapters" }, [
        el("caption", {}, ["Adapters that answered"]),
        el("thead", {}, [el("tr", {}, ["Adapter", "Contributor", "Weight", "Router score"].map(function (h) {
          return el("th", { scope: "col" }, [h]);
        }))]),
        el("tbody", {}, rows),
      ])]));
    } else {
      parts.push(el("p", { "class": "playground-base-only" },
        ["The base model answered alone: no adapter was chosen for this prompt."]));
    }
    if (info.scores && info.scores.length) {
      parts.push(el("div", { "class": "table-wrap" }, [el("table", { "class": "playground-scores" }, [
        el("caption", {}, ["Routing scores"]),
        el("thead", {}, [el("tr", {}, [el("th", { scope: "col" }, ["Candidate"]), el("th", { scope: "col" }, ["Score"])])]),
        el("tbody", {}, info.scores.map(function (s) {
          return el("tr", {}, [el("th", { scope: "row" }, [el("code", {}, [s.id])]), el("td", {}, [fixed(s.score)])]);
        })),
      ])]));
    }
    attributionBox.replaceChildren.apply(attributionBox, parts);
  }

  function busy(on) {
    answer.setAttribute("aria-busy", on ? "true" : "false");
    send.disabled = on;
    stop.hidden = !on;
  }

  // One SSE event ("data: {...}"); returns false at the end of the stream.
  function handle(event, state) {
    var data = event.split("\n").filter(function (line) { return line.indexOf("data:") === 0; })
      .map(function (line) { return line.slice(5).replace(/^ /, ""); }).join("\n");
    if (!data) { return true; }
    if (data === "[DONE]") { return false; }
    var chunk;
    try { chunk = JSON.parse(data); } catch (e) { return true; }
    if (chunk.error) {
      showError(chunk.error.message || "The answer failed.");
      return false;
    }
    if (chunk.tessera) { state.attribution = chunk.tessera; }
    if (chunk.usage) { state.usage = chunk.usage; }
    (chunk.choices || []).forEach(function (choice) {
      if (choice.delta && choice.delta.content) {
        answer.appendChild(document.createTextNode(choice.delta.content));
      }
      if (choice.finish_reason) { state.finish = choice.finish_reason; }
    });
    if (chunk.tessera || chunk.usage) { showAttribution(state.attribution, state.usage); }
    return true;
  }

  async function ask() {
    errorBox.replaceChildren();
    attributionBox.replaceChildren();
    answer.textContent = "";
    statusLine.textContent = "Routing your prompt…";
    controller = new AbortController();
    busy(true);
    var state = { attribution: null, usage: null, finish: null };
    try {
      var response = await fetch(form.dataset.streamUrl, {
        method: "POST",
        body: new FormData(form),
        headers: { "X-CSRFToken": form.elements.csrfmiddlewaretoken.value, Accept: "text/event-stream" },
        credentials: "same-origin",
        signal: controller.signal,
      });
      var type = response.headers.get("Content-Type") || "";
      if (!response.ok || type.indexOf("text/event-stream") !== 0) {
        var message = "The playground could not answer (HTTP " + response.status + ").";
        try { message = (await response.json()).error.message || message; } catch (e) { /* not JSON */ }
        showError(message);
        statusLine.textContent = "";
        return;
      }
      statusLine.textContent = "Answering…";
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      var going = true;
      while (going) {
        var read = await reader.read();
        if (read.done) { break; }
        buffer += decoder.decode(read.value, { stream: true }).replace(/\r\n/g, "\n");
        var events = buffer.split("\n\n");
        buffer = events.pop();
        for (var i = 0; i < events.length && going; i++) { going = handle(events[i], state); }
      }
      if (!going) { reader.cancel(); } // an error event or [DONE]: nothing more to read
      statusLine.textContent = state.finish === "length"
        ? "Done: the answer reached its token limit."
        : (state.finish ? "Done." : "");
    } catch (error) {
      if (error.name === "AbortError") {
        statusLine.textContent = "Stopped.";
      } else {
        showError("The connection to the portal was lost; try again.");
        statusLine.textContent = "";
      }
    } finally {
      controller = null;
      busy(false);
    }
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!controller) { ask(); }
  });
  stop.addEventListener("click", function () { if (controller) { controller.abort(); } });
  // Ctrl+Enter (or Cmd+Enter) sends from the prompt, as chat boxes do.
  form.elements.prompt.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit ? form.requestSubmit() : ask();
    }
  });
})();

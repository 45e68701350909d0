// The page: ask in several modes at once (the service batches them together), show the answers side by
// side with their passages and timings; add a document and follow its parameterization.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("prag-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("prag-api-key", keyInput.value));

async function call(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (keyInput.value) headers.Authorization = "Bearer " + keyInput.value;
  const response = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
  return data;
}

async function health() {
  try {
    const data = await call("GET", "/healthz");
    $("#health").textContent = `${data.model} · ${data.passages} passages`;
  } catch (error) {
    $("#health").textContent = "service unreachable: " + error.message;
  }
}

function card(mode) {
  const node = $("#result-template").content.firstElementChild.cloneNode(true);
  node.dataset.mode = mode;
  node.classList.add("pending");
  $(".mode", node).textContent = mode;
  $(".answer", node).textContent = "…";
  return node;
}

function fill(node, data) {
  node.classList.remove("pending");
  $(".answer", node).textContent = data.answer || "(empty)";
  $(".text", node).textContent = data.text;
  if (data.missing_adapters.length)
    $(".note", node).textContent = `answered without ${data.missing_adapters.length} adapter(s) not ready in time`;
  const timings = $(".timings", node);
  for (const [name, ms] of Object.entries(data.timings_ms)) {
    const row = timings.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = `${ms.toFixed(1)} ms`;
  }
  const merged = new Set(data.lora_documents);
  for (const p of data.passages) {
    const li = document.createElement("li");
    li.textContent = p.title || p.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = p.score.toFixed(2);
    li.append(score);
    if (merged.has(p.id)) {
      const lora = document.createElement("span");
      lora.className = "lora";
      lora.textContent = "LoRA";
      li.append(lora);
    }
    $(".passages", node).append(li);
  }
  node.dataset.done = "true";
}

$("#ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("#question").value;
  const top_k = Number($("#top-k").value);
  const modes = [...document.querySelectorAll("#modes input:checked")].map((box) => box.value);
  const results = $("#results");
  results.replaceChildren();
  $("#ask-error").hidden = true;
  $("#ask").disabled = true;
  await Promise.all(
    modes.map(async (mode) => {
      const node = card(mode);
      results.append(node);
      try {
        fill(node, await call("POST", "/v1/answer", { question, mode, top_k }));
      } catch (error) {
        node.remove();
        $("#ask-error").hidden = false;
        $("#ask-error").textContent = `${mode}: ${error.message}`;
      }
    }),
  );
  $("#ask").disabled = false;
});

$("#add-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const doc = { title: $("#doc-title").value, text: $("#doc-text").value };
  if ($("#doc-id").value) doc.id = $("#doc-id").value;
  const status = $("#add-status");
  try {
    const data = await call("POST", "/v1/documents", { documents: [doc] });
    const id = data.ids[0];
    status.textContent = `${id}: ${data.documents[0].status}`;
    for (;;) {  // follow its parameterization
      await new Promise((resolve) => setTimeout(resolve, 2000));
      const row = await call("GET", "/v1/documents/" + encodeURIComponent(id));
      status.textContent = `${id}: ${row.status}` + (row.error ? ` (${row.error})` : "");
      if (row.status === "ready" || row.status === "failed") break;
    }
  } catch (error) {
    status.textContent = "error: " + error.message;
  }
});

health();

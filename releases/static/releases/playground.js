// Progressive enhancement: the playground's answer appears as the model generates it. The form is posted with
// Accept: text/event-stream, and the view answers with the gateway's own stream (OpenAI's chat chunks, usage last),
// or with OpenAI's error JSON when the call is refused. Without JavaScript the form posts and the page comes back
// answered.
(function () {
  const form = document.querySelector("form[data-playground]");
  if (!form || !window.fetch || !window.TextDecoder) return;
  const answer = document.getElementById("answer");
  const text = document.getElementById("answer-text");
  const usage = document.getElementById("answer-usage");
  const error = document.getElementById("error");
  const button = form.querySelector("button[type=submit]");

  function fail(message) {
    error.hidden = false;  // shown first, then filled: a screen reader announces the alert's new text
    error.textContent = message;
  }

  // One server-sent event's data; returns true once the answer is over ([DONE], or an error mid-stream).
  function take(data) {
    if (data === "[DONE]") return true;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch (ignored) {
      return false;
    }
    if (chunk.error) {
      fail(chunk.error.message || "The model failed in the middle of the answer; retry.");
      return true;
    }
    const choice = (chunk.choices || [])[0];
    if (choice && choice.delta && typeof choice.delta.content === "string") text.textContent += choice.delta.content;
    if (chunk.usage) {
      usage.textContent = chunk.usage.prompt_tokens + " prompt + " + chunk.usage.completion_tokens +
        " completion tokens (metered)";
    }
    return false;
  }

  async function refusal(response) {
    if (response.redirected) return "Your session has ended: sign in again, then retry.";
    try {
      const payload = await response.json();
      if (payload.error && payload.error.message) return payload.error.message;
    } catch (ignored) {}
    // Django's own 403 page: the form's CSRF token is stale (signed in again in another tab, say).
    if (response.status === 403) return "This page is out of date: reload it, then send again.";
    return "The playground could not answer (HTTP " + response.status + "); retry.";
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    error.hidden = true;
    text.textContent = "";
    usage.textContent = "";
    button.disabled = true;
    answer.setAttribute("aria-busy", "true");  // announced once whole, not token by token
    try {
      const response = await fetch(window.location.href, {
        method: "POST", body: new FormData(form), credentials: "same-origin",
        headers: {"Accept": "text/event-stream"},
      });
      const type = response.headers.get("Content-Type") || "";
      if (!response.ok || response.redirected || !type.startsWith("text/event-stream")) {
        answer.hidden = true;
        fail(await refusal(response));
        return;
      }
      answer.hidden = false;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "", over = false;
      while (!over) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let end;
        while (!over && (end = buffer.indexOf("\n\n")) >= 0) {
          const lines = buffer.slice(0, end).split("\n");
          buffer = buffer.slice(end + 2);
          for (const line of lines) {
            if (line.startsWith("data: ") && take(line.slice(6))) over = true;
          }
        }
      }
      if (over) {
        // An error mid-stream ends the answer here: stop reading, so the gateway closes the engine's stream and the
        // engine stops generating (and metering) what nobody will read.
        reader.cancel().catch(function () {});
      } else {
        fail("The answer was cut short; retry.");
      }
    } catch (ignored) {
      fail("The connection to the server was lost; retry.");
    } finally {
      button.disabled = false;
      answer.removeAttribute("aria-busy");
    }
  });
})();

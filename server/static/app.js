// The voxloop page: speak (or upload a file), watch the transcript form, correct it.
//
// It talks to the server over one WebSocket (/ws) whose messages are the gRPC API's, in proto3 JSON
// (server/web.py documents the protocol): it only sees transcripts, words with confidence,
// stability, n-best alternatives, utterance ids and model versions, whatever model serves.
"use strict";

(() => {
  const CHUNK_S = 0.1; // audio per WebSocket message (the server's interim results come every 200 ms)
  const FILE_RATE_HZ = 16000; // uploaded files are decoded (and resampled) to this rate in the browser
  const MAX_BUFFERED_BYTES = 1 << 20; // a file upload waits while this much is still unsent
  const WANTED_ALTERNATIVES = 4; // n-best per final: the shown transcript and up to 3 other readings
  const TOKEN_KEY = "voxloop-token"; // sessionStorage: the token lives as long as the tab

  const $ = (id) => document.getElementById(id);
  const ui = {
    modelVersion: $("model-version"), modelNotice: $("model-notice"), auth: $("auth"), token: $("token"),
    start: $("start"), stop: $("stop"), upload: $("upload"), status: $("status"), error: $("error"),
    interim: $("interim"), finals: $("finals"), template: $("final-template"),
  };

  const session = {
    ws: null,
    ready: null, // Promise of the server's "ready" (hello accepted), or null when not connected
    welcome: null,
    model: null, // the serving model's summary, as the last ready/model message said
    nextCallId: 1,
    calls: new Map(), // call id -> {resolve, reject}
    recognition: null, // {kind: "microphone" | "file", ended: Promise, resolveEnded}
  };

  // ---- messages shown to the user ----

  function showStatus(text) {
    ui.status.textContent = text;
  }

  function showError(text) {
    ui.error.textContent = text;
  }

  function explain(error) {
    // A gRPC status from the server ({code, message}) as a sentence for the person at the page.
    switch (error.code) {
      case "UNAUTHENTICATED": // the server's details are written for API clients (metadata, flags)
        return /unknown/.test(error.message)
          ? "That access token was not accepted: check it, or ask the server's operator for a valid one."
          : "This server needs an access token: enter yours in the Access token field and press Connect.";
      case "PERMISSION_DENIED":
        return "Refused: " + error.message;
      case "RESOURCE_EXHAUSTED":
        return "Too much at once: " + error.message;
      case "NOT_FOUND":
        return "Not found: " + error.message;
      case "DEADLINE_EXCEEDED":
        return "Stopped: " + error.message;
      case "UNAVAILABLE":
        return "The server is not available: " + error.message;
      default:
        return error.message ? error.message + " (" + error.code + ")" : String(error);
    }
  }

  // ---- the connection ----

  function connect() {
    if (session.ready) {
      return session.ready;
    }
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/ws");
    ws.binaryType = "arraybuffer";
    session.ws = ws;
    session.ready = new Promise((resolve, reject) => {
      ws.addEventListener("message", (event) => onMessage(event, resolve, reject));
      ws.addEventListener("close", (event) => {
        if (session.ws === ws) {
          session.ws = null;
          session.ready = null;
        }
        const lost = {code: "UNAVAILABLE", message: "the connection closed" + (event.reason ? ": " + event.reason : "")};
        reject(lost);
        for (const pending of session.calls.values()) {
          pending.reject(lost);
        }
        session.calls.clear();
        if (event.code === 1009) {
          showError("The server refused a message over its size limit and closed the connection.");
        } else if (event.code === 1001) {
          showError("The server went away (" + (event.reason || "restarting") + "). Your transcripts stay here; "
            + "try again in a moment.");
        }
        endRecognition(lost);
      });
    });
    session.ready.catch(() => {}); // shown where it is awaited; an unawaited failure is not an error
    return session.ready;
  }

  function reconnect() {
    if (session.ws) {
      session.ws.close(1000, "new token");
    }
    session.ws = null;
    session.ready = null;
    return connect();
  }

  function send(message) {
    session.ws.send(JSON.stringify(message));
  }

  function onMessage(event, resolveReady, rejectReady) {
    if (typeof event.data !== "string") {
      return; // the server sends only JSON
    }
    const message = JSON.parse(event.data);
    switch (message.type) {
      case "welcome":
        session.welcome = message;
        ui.auth.hidden = !message.auth_required;
        send({type: "hello", token: message.auth_required ? ui.token.value.trim() : undefined});
        break;
      case "ready":
        showModel(message.model);
        showError("");
        resolveReady(message);
        break;
      case "model":
        showModel(message.model);
        break;
      case "response":
        onRecognitionResponse(message.response);
        break;
      case "end":
        endRecognition(null);
        break;
      case "reply":
        settleCall(message.id, (pending) => pending.resolve(message.response));
        break;
      case "error":
        onError(message, rejectReady);
        break;
      default:
        break; // newer servers may send more; this page ignores what it does not know
    }
  }

  function onError(message, rejectReady) {
    if (message.scope === "hello") {
      if (message.code === "UNAUTHENTICATED") {
        ui.auth.hidden = false;
        ui.modelVersion.textContent = "(needs an access token)";
      }
      showError(explain(message));
      rejectReady(message);
      session.ready = null; // the next action says hello again (with the token typed by then)
      session.ws.close(1000, "not authenticated");
    } else if (message.scope === "stream") {
      showError(explain(message));
      endRecognition(message);
    } else if (message.id !== undefined && session.calls.has(message.id)) {
      settleCall(message.id, (pending) => pending.reject(message));
    } else {
      showError(explain(message));
    }
  }

  function call(method, request) {
    // One unary RPC through the bridge; resolves with its response, rejects with {code, message}.
    return connect().then(() => new Promise((resolve, reject) => {
      const id = session.nextCallId++;
      session.calls.set(id, {resolve, reject});
      send({type: "call", id, method, request});
    }));
  }

  function settleCall(id, settle) {
    const pending = session.calls.get(id);
    if (pending) {
      session.calls.delete(id);
      settle(pending);
    }
  }

  // ---- the serving model ----

  function showModel(model) {
    const previous = session.model;
    session.model = model;
    ui.modelVersion.textContent = model.version;
    if (previous && previous.version !== model.version) {
      const trained = model.trained_on_feedback;
      ui.modelNotice.textContent = "Now serving " + model.version
        + (trained === null || trained === undefined ? "." : ", trained on " + trained
          + (trained === 1 ? " correction." : " corrections."));
      ui.modelNotice.hidden = false;
    }
  }

  // ---- recognition: microphone and files ----

  function beginRecognition(kind, sampleRateHz) {
    let resolveEnded;
    const ended = new Promise((resolve) => { resolveEnded = resolve; });
    session.recognition = {kind, ended, resolveEnded};
    send({
      type: "start",
      config: {
        encoding: "LINEAR16", sample_rate_hz: sampleRateHz, audio_channel_count: 1, interim_results: true,
        max_alternatives: Math.min(WANTED_ALTERNATIVES, session.welcome ? session.welcome.max_alternatives : 1),
      },
    });
    ui.start.disabled = true;
    ui.upload.disabled = true;
    ui.stop.disabled = false;
  }

  function endRecognition(error) {
    const recognition = session.recognition;
    if (!recognition) {
      return;
    }
    session.recognition = null;
    stopCapture();
    setInterim("", "");
    ui.start.disabled = false;
    ui.upload.disabled = false;
    ui.stop.disabled = true;
    if (!error) {
      showStatus(recognition.kind === "file" ? "File recognized." : "Stopped.");
    } else {
      showStatus("");
    }
    recognition.resolveEnded(error);
  }

  let capture = null; // {media, context, node}

  async function startMicrophone() {
    showError("");
    try {
      await connect();
    } catch (error) {
      showError(explain(error));
      return;
    }
    let media;
    try {
      media = await navigator.mediaDevices.getUserMedia({
        // Raw audio: browser speech processing is tuned for calls, not for a recognizer.
        audio: {channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false},
      });
    } catch (error) {
      showError("No microphone: " + error.message + ". Allow the page to use it, or upload a file.");
      return;
    }
    const context = new AudioContext();
    await context.audioWorklet.addModule("/static/capture-worklet.js");
    const source = context.createMediaStreamSource(media);
    const node = new AudioWorkletNode(context, "pcm16-capture", {
      numberOfOutputs: 1,
      processorOptions: {chunkSamples: Math.round(context.sampleRate * CHUNK_S)},
    });
    const mute = context.createGain(); // the graph is pulled from the destination; nothing is heard
    mute.gain.value = 0;
    source.connect(node).connect(mute).connect(context.destination);
    capture = {media, context, node};
    beginRecognition("microphone", context.sampleRate);
    node.port.onmessage = (event) => {
      if (session.recognition && session.ws && session.ws.readyState === WebSocket.OPEN) {
        session.ws.send(event.data);
      }
    };
    showStatus("Listening… speak now, then press Stop.");
  }

  function stopCapture() {
    if (!capture) {
      return;
    }
    capture.node.port.onmessage = null;
    capture.media.getTracks().forEach((track) => track.stop());
    capture.context.close();
    capture = null;
  }

  function stop() {
    if (!session.recognition) {
      return;
    }
    stopCapture();
    send({type: "stop"}); // the server sends the last final, then "end"
    ui.stop.disabled = true;
    showStatus("Finishing…");
  }

  async function recognizeFile(file) {
    showError("");
    if (session.recognition) {
      showError("Stop the current recognition first.");
      return;
    }
    try {
      await connect();
    } catch (error) {
      showError(explain(error));
      return;
    }
    showStatus("Decoding " + file.name + "…");
    let audio;
    try {
      // decodeAudioData reads WAV and FLAC and resamples to the context's rate.
      const decoder = new OfflineAudioContext(1, 1, FILE_RATE_HZ);
      audio = await decoder.decodeAudioData(await file.arrayBuffer());
    } catch (error) {
      showError("Could not read " + file.name + " as audio (WAV or FLAC): " + error.message);
      showStatus("");
      return;
    }
    const pcm = toPcm16(audio);
    beginRecognition("file", audio.sampleRate);
    showStatus("Recognizing " + file.name + "…");
    const chunkSamples = Math.round(audio.sampleRate * CHUNK_S);
    const recognition = session.recognition;
    for (let offset = 0; offset < pcm.length; offset += chunkSamples) {
      while (session.ws && session.ws.bufferedAmount > MAX_BUFFERED_BYTES) {
        await new Promise((resolve) => setTimeout(resolve, 20)); // no event tells when the buffer drains
      }
      if (session.recognition !== recognition || !session.ws) {
        return; // ended early (an error, or the connection closed): already shown
      }
      session.ws.send(pcm.slice(offset, offset + chunkSamples).buffer);
    }
    stop();
  }

  function toPcm16(audio) {
    const samples = new Int16Array(audio.length);
    const channels = [];
    for (let c = 0; c < audio.numberOfChannels; c++) {
      channels.push(audio.getChannelData(c));
    }
    for (let i = 0; i < audio.length; i++) {
      let sample = 0;
      for (const channel of channels) {
        sample += channel[i];
      }
      sample = Math.max(-1, Math.min(1, sample / channels.length));
      samples[i] = sample < 0 ? sample * 0x8000 : sample * 0x7fff;
    }
    return samples;
  }

  // ---- results ----

  function onRecognitionResponse(response) {
    for (const result of response.results || []) {
      const best = (result.alternatives || [])[0] || {transcript: "", words: []};
      if (result.is_final) {
        setInterim("", "");
        if (best.transcript.trim()) {
          addFinal(result);
        }
      } else {
        setInterim(result.stable_transcript || "", best.transcript);
      }
    }
  }

  function setInterim(stable, transcript) {
    // The stable prefix will not change; the rest may (shown lighter and in italics).
    ui.interim.replaceChildren();
    const unstable = transcript.startsWith(stable) ? transcript.slice(stable.length) : transcript;
    const stableSpan = document.createElement("span");
    stableSpan.className = "stable";
    stableSpan.textContent = transcript.startsWith(stable) ? stable : "";
    const unstableSpan = document.createElement("span");
    unstableSpan.className = "unstable";
    unstableSpan.textContent = unstable;
    ui.interim.append(stableSpan, unstableSpan);
  }

  function wordSpans(alternative) {
    // Words shaded by confidence: the less sure, the darker the highlight (and a dotted underline).
    const words = alternative.words && alternative.words.length
      ? alternative.words
      : alternative.transcript.split(/\s+/).filter(Boolean).map((word) => ({word, confidence: null}));
    const spans = [];
    words.forEach((info, i) => {
      if (i > 0) {
        spans.push(document.createTextNode(" "));
      }
      const span = document.createElement("span");
      span.className = "word";
      span.textContent = info.word;
      if (typeof info.confidence === "number") {
        const confidence = Math.max(0, Math.min(1, info.confidence));
        span.style.setProperty("--doubt", (1 - confidence).toFixed(2));
        span.dataset.confidence = confidence.toFixed(2);
        span.title = "confidence " + Math.round(confidence * 100) + "%";
        if (confidence < 0.7) {
          span.classList.add("unsure");
        }
      }
      spans.push(span);
    });
    return spans;
  }

  function addFinal(result) {
    const item = ui.template.content.firstElementChild.cloneNode(true);
    const utteranceId = result.utterance_id;
    const alternatives = result.alternatives || [];
    const best = alternatives[0];
    item.dataset.utteranceId = utteranceId;
    item.dataset.modelVersion = result.model_version;
    const transcript = item.querySelector(".transcript");
    transcript.append(...wordSpans(best));
    item.querySelector(".meta").textContent = "heard by " + result.model_version;
    const receipt = item.querySelector(".receipt");
    const editor = item.querySelector(".editor");
    const input = item.querySelector(".correction");
    const editButton = item.querySelector(".edit");
    const label = "transcript " + (ui.finals.children.length + 1);
    item.setAttribute("aria-label", label);
    input.setAttribute("aria-label", "Correction of " + label);

    const act = async (method, request, describe, button) => {
      receipt.classList.remove("error");
      receipt.textContent = "Saving…";
      button.disabled = true;
      try {
        const response = await call(method, {utterance_id: utteranceId, ...request});
        receipt.textContent = describe(response);
        return response;
      } catch (error) {
        receipt.classList.add("error");
        receipt.textContent = explain(error);
        return null;
      } finally {
        button.disabled = false;
      }
    };
    const setText = (text) => {
      transcript.replaceChildren(...wordSpans({transcript: text, words: []}));
    };
    const closeEditor = () => {
      editor.hidden = true;
      transcript.hidden = false;
      editButton.focus();
    };

    editButton.addEventListener("click", () => {
      input.value = transcript.textContent;
      transcript.hidden = true;
      editor.hidden = false;
      input.focus();
      input.select();
    });
    const submit = async () => {
      const text = input.value.trim();
      if (!text) {
        receipt.classList.add("error");
        receipt.textContent = "Type what was said (or press Right if the transcript is right).";
        return;
      }
      const response = await act("SubmitCorrection", {corrected_text: text}, (r) =>
        "Correction saved. Reward of what was heard: " + formatReward(r.reward)
        + (r.flagged ? " (flagged: very different from what was heard)" : ""), item.querySelector(".submit"));
      if (response) {
        setText(response.normalized_text);
        item.dataset.feedback = "correction";
        closeEditor();
      }
    };
    item.querySelector(".submit").addEventListener("click", submit);
    item.querySelector(".cancel").addEventListener("click", closeEditor);
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        submit();
      } else if (event.key === "Escape") {
        event.preventDefault();
        closeEditor();
      }
    });
    item.querySelector(".accept").addEventListener("click", async (event) => {
      if (await act("AcceptTranscript", {}, (r) => "Marked right. Reward: " + formatReward(r.reward),
        event.currentTarget)) {
        item.dataset.feedback = "acceptance";
      }
    });
    item.querySelector(".reject").addEventListener("click", async (event) => {
      if (await act("RejectTranscript", {}, (r) => "Marked wrong. Reward: " + formatReward(r.reward),
        event.currentTarget)) {
        item.dataset.feedback = "rejection";
      }
    });

    const group = item.querySelector(".alternatives");
    group.setAttribute("aria-label", "Other readings of " + label);
    alternatives.slice(1).forEach((alternative, i) => {
      if (!alternative.transcript.trim()) {
        return;
      }
      const button = document.createElement("button");
      button.type = "button";
      button.className = "alternative";
      button.dataset.index = String(i + 1);
      button.textContent = alternative.transcript;
      button.addEventListener("click", async () => {
        const response = await act("ChooseAlternative", {alternative_index: i + 1}, (r) =>
          "Chose \u201c" + r.chosen_text + "\u201d. Reward of what was heard: " + formatReward(r.reward), button);
        if (response) {
          setText(response.chosen_text);
          item.dataset.feedback = "choice";
        }
      });
      group.append(button);
      group.hidden = false;
    });

    ui.finals.append(item);
  }

  function formatReward(reward) {
    return Number(reward || 0).toFixed(2).replace("-", "\u2212");
  }

  // ---- wiring ----

  ui.start.addEventListener("click", startMicrophone);
  ui.stop.addEventListener("click", stop);
  ui.upload.addEventListener("change", () => {
    const file = ui.upload.files[0];
    if (file) {
      recognizeFile(file).finally(() => { ui.upload.value = ""; });
    }
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) {
      recognizeFile(file);
    }
  });
  ui.auth.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, ui.token.value.trim());
    showError("");
    showStatus("Connecting…");
    reconnect().then(() => showStatus("Connected."), (error) => showError(explain(error)));
  });
  ui.token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  if (!window.AudioWorkletNode || !navigator.mediaDevices) {
    ui.start.disabled = true;
    showStatus("This browser cannot record here (it needs a secure page: https, or localhost); upload a file.");
  }
  connect().catch((error) => showError(explain(error)));
})();

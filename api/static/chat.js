// The Dawet chat page: one WebSocket to /v1/chat, conversations kept by the server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    connection: $("connection"), newChat: $("new-chat"), model: $("model"),
    system: $("system-prompt"), maxNew: $("max-new-tokens"), minNew: $("min-new-tokens"), temperature: $("temperature"),
    error: $("error"), messages: $("messages"), composer: $("composer"), input: $("input"),
    send: $("send"), stop: $("stop"), regenerate: $("regenerate"),
  };
  const STORAGE_KEY = "dawet.conversation";
  const API_KEY_STORAGE = "dawet.apiKey";
  const apiKey = $("api-key");
  apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
  const state = {
    models: {},            // name -> the model's entry from /v1/chat/models
    conversationId: null,
    socket: null,
    outbox: [],            // frames waiting for the socket to open
    retries: 0,
    reply: null,           // the reply on screen that is not finished yet
  };

  // ---- connection ---------------------------------------------------------------------------

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // Browsers cannot set headers on a WebSocket: the key travels as ?access_token=.
    const token = apiKey.value ? `?access_token=${encodeURIComponent(apiKey.value)}` : "";
    const socket = new WebSocket(`${scheme}://${location.host}/v1/chat${token}`);
    state.socket = socket;
    setConnection("connecting", "connecting…");
    socket.onopen = () => {
      state.retries = 0;
      setConnection("open", "connected");
      const reply = state.reply;
      if (reply && reply.jobId && !reply.done) {  // a dropped connection: pick up after lastSeq
        socket.send(JSON.stringify({type: "resume", job_id: reply.jobId, after: reply.lastSeq,
                                    conversation_id: state.conversationId}));
      }
      state.outbox.splice(0).forEach((frame) => socket.send(frame));
    };
    socket.onmessage = (message) => handleFrame(JSON.parse(message.data));
    socket.onclose = () => {
      if (state.socket !== socket) return;  // replaced on purpose
      state.socket = null;
      setConnection("closed", "reconnecting…");
      const delay = Math.min(5000, 250 * 2 ** state.retries++);
      setTimeout(connect, delay);
    };
  }

  function reconnect() {
    const old = state.socket;
    state.socket = null;
    if (old) old.close();
    connect();
  }

  function post(frame) {
    const text = JSON.stringify(frame);
    if (state.socket && state.socket.readyState === WebSocket.OPEN) state.socket.send(text);
    else state.outbox.push(text);
  }

  function setConnection(kind, label) {
    els.connection.dataset.state = kind;
    els.connection.textContent = label;
  }

  // ---- frames from the server ---------------------------------------------------------------

  function handleFrame(frame) {
    const reply = state.reply;
    if (frame.type === "turn") {
      if (frame.conversation_id) setConversation(frame.conversation_id);
      if (reply) {
        reply.jobId = frame.job_id;
        reply.bubble.dataset.jobId = frame.job_id;
        reply.lastSeq = Math.max(reply.lastSeq, frame.after || 0);
      }
      return;
    }
    if (frame.seq === undefined) {  // an error about the frame we sent, or a stalled stream
      showError(frame.error.message);
      if (reply && (!reply.jobId || frame.error.code === "stream_timeout")) {
        finishReply("failed", frame.error.message);
      }
      return;
    }
    if (!reply || frame.seq <= reply.lastSeq) return;  // replayed after a resume: seen already
    reply.lastSeq = frame.seq;
    if (frame.type === "status") setMeta(reply.bubble, frame.state);  // a restart continues the reply
    else if (frame.type === "token") appendToken(reply, frame.text);
    else if (frame.type === "done") finishReply(frame.finish_reason === "cancelled" ? "cancelled" : "succeeded", stats(frame));
    else if (frame.type === "error") {
      showError(frame.error.message);
      finishReply("failed", frame.error.message);
    }
  }

  function appendToken(reply, text) {
    if (reply.firstAt === null) reply.firstAt = performance.now();
    reply.bubble.dataset.state = "streaming";
    reply.text.textContent += text;
    const ttft = (reply.firstAt - reply.sentAt) / 1000;
    setMeta(reply.bubble, `streaming · first token after ${ttft.toFixed(2)} s`);
    reply.bubble.scrollIntoView({block: "end"});
  }

  function finishReply(finalState, meta) {
    const reply = state.reply;
    if (!reply) return;
    reply.done = true;
    reply.bubble.dataset.state = finalState;
    setMeta(reply.bubble, finalState === "failed" ? `failed: ${meta}` : meta);
    state.reply = null;
    setBusy(false);
  }

  function stats(turn) {
    const parts = [turn.finish_reason || turn.state];
    const timings = turn.timings || {};
    if (timings.time_to_first_token_seconds !== undefined) {
      parts.push(`TTFT ${timings.time_to_first_token_seconds.toFixed(2)} s`);
    }
    if (timings.tokens_per_second) parts.push(`${timings.tokens_per_second.toFixed(1)} tok/s`);
    if (turn.usage) parts.push(`${turn.usage.completion_tokens} tokens`);
    return parts.join(" · ");
  }

  // ---- the conversation on screen -----------------------------------------------------------

  function addMessage(role, text, turnState) {
    const bubble = document.createElement("div");
    bubble.className = `message ${role}`;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    bubble.append(body);
    if (role === "assistant") {
      bubble.dataset.state = turnState;
      const meta = document.createElement("span");
      meta.className = "meta";
      bubble.append(meta);
    }
    els.messages.append(bubble);
    bubble.scrollIntoView({block: "end"});
    return bubble;
  }

  function setMeta(bubble, text) {
    bubble.querySelector(".meta").textContent = text;
  }

  function startReply(bubble) {
    bubble.dataset.state = "pending";
    bubble.querySelector(".text").textContent = "";
    setMeta(bubble, "waiting…");
    state.reply = {jobId: null, lastSeq: 0, bubble, text: bubble.querySelector(".text"),
                   sentAt: performance.now(), firstAt: null, done: false};
    setBusy(true);
  }

  function setBusy(busy) {
    els.send.disabled = busy;
    els.stop.hidden = !busy;
    els.regenerate.disabled = busy || !els.messages.querySelector(".message.assistant");
  }

  function setConversation(id) {
    state.conversationId = id;
    const url = new URL(location.href);
    if (id) {
      localStorage.setItem(STORAGE_KEY, id);
      url.searchParams.set("c", id);
    } else {
      localStorage.removeItem(STORAGE_KEY);
      url.searchParams.delete("c");
    }
    history.replaceState(null, "", url);
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  // ---- user actions -------------------------------------------------------------------------

  function sampling() {
    const fields = {};
    if (els.maxNew.value) fields.max_new_tokens = parseInt(els.maxNew.value, 10);
    if (els.minNew.value) fields.min_new_tokens = parseInt(els.minNew.value, 10);
    if (els.temperature.value) fields.temperature = parseFloat(els.temperature.value);
    return fields;
  }

  function sendMessage() {
    const content = els.input.value.trim();
    if (!content || state.reply) return;
    showError("");
    els.input.value = "";
    addMessage("user", content);
    startReply(addMessage("assistant", "", "pending"));
    const model = state.models[els.model.value];
    const systemPrompt = els.system.value === (model.system_prompt || "") ? null : els.system.value;
    post({type: "message", conversation_id: state.conversationId, model: model.name,
          content, system_prompt: systemPrompt, ...sampling()});
  }

  function regenerate() {
    const bubbles = els.messages.querySelectorAll(".message.assistant");
    if (state.reply || !bubbles.length || !state.conversationId) return;
    showError("");
    startReply(bubbles[bubbles.length - 1]);
    post({type: "regenerate", conversation_id: state.conversationId, ...sampling()});
  }

  function newChat() {
    if (state.reply && state.reply.jobId) post({type: "cancel"});
    state.reply = null;
    state.outbox = [];
    setConversation(null);
    els.messages.replaceChildren();
    showError("");
    setBusy(false);
    // At once: close() still sends the queued cancel first, and a message typed from now on
    // waits in the outbox for the new socket (a timer here let it go out on the old one).
    reconnect();
  }

  function chooseModel(name) {
    const previous = state.models[els.model.value];
    const model = state.models[name];
    if (!model) return;
    if (!previous || els.system.value === (previous.system_prompt || "") || !els.system.value) {
      els.system.value = model.system_prompt || "";
    }
    els.model.value = name;
    els.maxNew.placeholder = `default ${model.defaults.max_new_tokens}`;
    els.maxNew.max = model.max_new_tokens_limit;
    els.minNew.placeholder = `default ${model.defaults.min_new_tokens}`;
    els.temperature.placeholder = `default ${model.defaults.temperature}`;
  }

  // ---- start-up -----------------------------------------------------------------------------

  async function getJSON(url) {
    const headers = apiKey.value ? {Authorization: `Bearer ${apiKey.value}`} : {};
    const response = await fetch(url, {headers});
    const body = await response.json();
    if (!response.ok) throw Object.assign(new Error(body.error.message), {status: response.status});
    return body;
  }

  async function loadModels() {
    const list = await getJSON("/v1/chat/models");
    for (const model of list.models) {
      state.models[model.name] = model;
      els.model.append(new Option(model.name, model.name));
    }
    chooseModel(list.default);
  }

  async function restore(id) {
    let conversation;
    try {
      conversation = await getJSON(`/v1/conversations/${encodeURIComponent(id)}`);
    } catch (error) {
      if (error.status === 404) setConversation(null);
      else showError(error.message);
      return;
    }
    setConversation(conversation.id);
    chooseModel(conversation.model);
    if (conversation.system_prompt) els.system.value = conversation.system_prompt;
    for (const turn of conversation.turns) {
      addMessage("user", turn.user);
      const bubble = addMessage("assistant", turn.assistant, turn.state);
      bubble.dataset.jobId = turn.job_id;
      if (turn.state === "pending") {  // still being written: replay it from the start
        startReply(bubble);
        state.reply.jobId = turn.job_id;
      } else {
        setMeta(bubble, turn.error ? `failed: ${turn.error.message}` : stats(turn));
      }
    }
  }

  async function start() {
    els.composer.addEventListener("submit", (event) => { event.preventDefault(); sendMessage(); });
    els.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); sendMessage(); }
    });
    els.stop.addEventListener("click", () => post({type: "cancel"}));
    els.regenerate.addEventListener("click", regenerate);
    els.newChat.addEventListener("click", newChat);
    apiKey.addEventListener("change", () => {
      localStorage.setItem(API_KEY_STORAGE, apiKey.value);
      reconnect();
      loadModels().then(() => showError(""), (error) => showError(error.message));
    });
    els.model.addEventListener("change", () => chooseModel(els.model.value));
    try {
      await loadModels();
      const id = new URL(location.href).searchParams.get("c") || localStorage.getItem(STORAGE_KEY);
      if (id) await restore(id);
    } catch (error) {
      showError(error.message);
    }
    setBusy(Boolean(state.reply));
    connect();
    document.body.dataset.ready = "true";
  }

  // For tests and the curious: drop the socket as a flaky network would. A dead network
  // delivers nothing more, while Chromium still hands over frames during the close handshake.
  window.dawetChat = {
    dropConnection: () => {
      const socket = state.socket;
      if (!socket) return;
      socket.onmessage = null;
      socket.close();
    },
  };
  start();
})();

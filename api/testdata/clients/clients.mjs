// Runs the official OpenAI, Ollama and Anthropic clients against a Strata server and fails
// (exit 1, with the reason) at the first answer that is not what the client expects.
// Usage: STRATA_URL=http://127.0.0.1:PORT STRATA_MODEL=name node clients.mjs
import assert from "node:assert/strict";
import OpenAI from "openai";
import { Ollama } from "ollama";
import Anthropic from "@anthropic-ai/sdk";

const base = process.env.STRATA_URL;
const model = process.env.STRATA_MODEL;
const key = process.env.STRATA_KEY || "none";
const log = (what, v) => console.log(what, JSON.stringify(v));

async function openai() {
  const c = new OpenAI({ baseURL: base + "/v1", apiKey: key, maxRetries: 0 });
  const models = await c.models.list();
  assert.ok(models.data.some((m) => m.id === model), "model listed");
  const chat = await c.chat.completions.create({
    model, max_tokens: 8, temperature: 0, messages: [{ role: "user", content: "hi" }],
    logprobs: true, top_logprobs: 2, n: 2,
  });
  assert.equal(chat.choices.length, 2);
  assert.equal(chat.choices[0].message.content, chat.choices[1].message.content, "greedy choices agree");
  assert.equal(chat.choices[0].logprobs.content.length, chat.usage.completion_tokens / 2);
  let streamed = "";
  const stream = await c.chat.completions.create({
    model, max_tokens: 8, temperature: 0, stream: true, messages: [{ role: "user", content: "hi" }],
  });
  for await (const ch of stream) streamed += ch.choices[0]?.delta?.content ?? "";
  assert.equal(streamed, chat.choices[0].message.content, "stream equals whole");
  const text = await c.completions.create({ model, prompt: [1, 2, 3], max_tokens: 4, temperature: 0, logprobs: 1 });
  assert.equal(text.usage.prompt_tokens, 3);
  assert.equal(text.choices[0].logprobs.tokens.length, text.usage.completion_tokens);
  await assert.rejects(
    c.chat.completions.create({ model, messages: [{ role: "user", content: "hi" }], functions: [{ name: "f" }] }),
    (e) => e.status === 400 && /functions/.test(e.message),
  );
  log("openai", { chat: chat.choices[0].message.content, text: text.choices[0].text });
}

async function ollama() {
  const c = new Ollama({ host: base, headers: { Authorization: "Bearer " + key } });
  const v = await c.version();
  assert.ok(v.version, "version");
  const list = await c.list();
  assert.ok(list.models.some((m) => m.name === model), "model listed");
  const ps = await c.ps();
  assert.ok(ps.models.length >= 1, "model running");
  const show = await c.show({ model });
  assert.equal(show.details.format, "gguf");
  const opts = { temperature: 0, num_predict: 8 };
  const chat = await c.chat({ model, messages: [{ role: "user", content: "hi" }], options: opts, stream: false });
  assert.equal(chat.done, true);
  let streamed = "";
  for await (const part of await c.chat({ model, messages: [{ role: "user", content: "hi" }], options: opts, stream: true })) {
    streamed += part.message.content;
  }
  assert.equal(streamed, chat.message.content, "stream equals whole");
  const gen = await c.generate({ model, prompt: "Once upon a time", raw: true, options: opts });
  assert.equal(gen.eval_count, 8);
  let genStreamed = "";
  for await (const part of await c.generate({ model, prompt: "Once upon a time", raw: true, options: opts, stream: true })) {
    genStreamed += part.response;
  }
  assert.equal(genStreamed, gen.response);
  await assert.rejects(c.chat({ model: "no-such-model", messages: [{ role: "user", content: "hi" }] }), (e) => e.status_code === 404);
  log("ollama", { chat: chat.message.content, generate: gen.response });
}

async function anthropic() {
  const c = new Anthropic({ baseURL: base, apiKey: key, maxRetries: 0 });
  const msg = await c.messages.create({ model, max_tokens: 8, temperature: 0, system: "Be brief.", messages: [{ role: "user", content: "hi" }] });
  assert.equal(msg.role, "assistant");
  assert.equal(msg.stop_reason, "max_tokens");
  assert.equal(msg.usage.output_tokens, 8);
  const stream = c.messages.stream({ model, max_tokens: 8, temperature: 0, system: "Be brief.", messages: [{ role: "user", content: "hi" }] });
  let deltas = "";
  stream.on("text", (t) => { deltas += t; });
  const final = await stream.finalMessage();
  assert.equal(final.content[0].text, msg.content[0].text, "stream equals whole");
  assert.equal(deltas, msg.content[0].text);
  assert.equal(final.stop_reason, "max_tokens");
  await assert.rejects(
    c.messages.create({ model, max_tokens: 8, messages: [{ role: "user", content: "hi" }], tools: [{ name: "f", input_schema: { type: "object" } }] }),
    (e) => e.status === 400 && e.error?.error?.type === "invalid_request_error",
  );
  log("anthropic", { text: msg.content[0].text });
}

try {
  await openai();
  await ollama();
  await anthropic();
  console.log("ok");
} catch (e) {
  console.error("FAIL", e?.stack || e);
  process.exit(1);
}

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
const unit = (v) => Math.abs(v.reduce((s, x) => s + x * x, 0) - 1) < 1e-4;
const weather = {
  type: "object",
  properties: { city: { type: "string", maxLength: 20 }, days: { type: "integer" }, unit: { enum: ["celsius", "fahrenheit"] } },
  required: ["city", "days", "unit"], additionalProperties: false,
};
const validWeather = (a) => typeof a.city === "string" && Number.isInteger(a.days) && ["celsius", "fahrenheit"].includes(a.unit);

async function openai() {
  const c = new OpenAI({ baseURL: base + "/v1", apiKey: key, maxRetries: 0 });
  const models = await c.models.list();
  assert.ok(models.data.some((m) => m.id === model), "model listed");
  const chat = await c.chat.completions.create({
    model, max_tokens: 8, temperature: 0, messages: [{ role: "user", content: "hi" }],
    logprobs: true, top_logprobs: 2, n: 2,
  });
  assert.equal(chat.choices.length, 2);
  // Two concurrent sessions share the stages' KV caches, which can flip near-ties: their
  // text is not compared with each other or with a run alone.
  assert.equal(chat.choices[0].logprobs.content.length + chat.choices[1].logprobs.content.length, chat.usage.completion_tokens);
  const solo = await c.chat.completions.create({
    model, max_tokens: 8, temperature: 0, messages: [{ role: "user", content: "hi" }],
  });
  let streamed = "";
  const stream = await c.chat.completions.create({
    model, max_tokens: 8, temperature: 0, stream: true, messages: [{ role: "user", content: "hi" }],
  });
  for await (const ch of stream) streamed += ch.choices[0]?.delta?.content ?? "";
  assert.equal(streamed, solo.choices[0].message.content, "stream equals whole");
  const text = await c.completions.create({ model, prompt: [1, 2, 3], max_tokens: 4, temperature: 0, logprobs: 1 });
  assert.equal(text.usage.prompt_tokens, 3);
  assert.equal(text.choices[0].logprobs.tokens.length, text.usage.completion_tokens);
  await assert.rejects(
    c.chat.completions.create({ model, messages: [{ role: "user", content: "hi" }], functions: [{ name: "f" }] }),
    (e) => e.status === 400 && /functions/.test(e.message),
  );
  // Embeddings: the client asks for base64 and decodes it.
  const emb = await c.embeddings.create({ model, input: ["The quick brown fox", "jumps over"] });
  assert.equal(emb.data.length, 2);
  assert.ok(emb.data.every((d) => d.embedding.length > 0 && unit(d.embedding)), "unit embeddings");
  assert.ok(emb.usage.prompt_tokens > 0);
  log("openai", { chat: chat.choices[0].message.content, text: text.choices[0].text, embedding: emb.data[0].embedding.length });
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

  // Tools: Ollama has no tool_choice, so on random weights format forces the bare-JSON call
  // the tiny model's template asks for; the client gets it as tool_calls.
  const tools = [{ type: "function", function: { name: "get_weather", description: "Weather forecast", parameters: weather } }];
  const format = { type: "object", properties: { name: { enum: ["get_weather"] }, parameters: weather }, required: ["name", "parameters"], additionalProperties: false };
  const call = await c.chat({ model, messages: [{ role: "user", content: "Weather in Oslo?" }], tools, format, options: { num_predict: 80, seed: 1 }, stream: false });
  const tc = call.message.tool_calls?.[0];
  assert.equal(tc?.function.name, "get_weather", JSON.stringify(call.message));
  assert.ok(validWeather(tc.function.arguments), "arguments are an object matching the schema");
  let streamedCall;
  for await (const part of await c.chat({ model, messages: [{ role: "user", content: "Weather in Oslo?" }], tools, format, options: { num_predict: 80, seed: 1 }, stream: true })) {
    streamedCall ??= part.message.tool_calls?.[0];
  }
  assert.equal(streamedCall?.function.name, "get_weather");
  const answered = await c.chat({ model, tools, options: { num_predict: 2 }, messages: [
    { role: "user", content: "Weather in Oslo?" }, { role: "assistant", content: "", tool_calls: [tc] },
    { role: "tool", tool_name: "get_weather", content: "3 degrees" }] });
  assert.equal(answered.done, true);

  const embed = await c.embed({ model, input: ["The quick brown fox", "jumps over"] });
  assert.equal(embed.embeddings.length, 2);
  assert.ok(embed.embeddings.every(unit), "unit embeddings");
  const legacy = await c.embeddings({ model, prompt: "The quick brown fox" });
  assert.deepEqual(legacy.embedding.map((x) => x.toFixed(5)), embed.embeddings[0].map((x) => x.toFixed(5)));
  log("ollama", { chat: chat.message.content, generate: gen.response, tool_call: tc.function });
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
    c.messages.create({ model, max_tokens: 8, messages: [{ role: "user", content: "hi" }], tools: [{ type: "web_search_20250305", name: "web_search" }] }),
    (e) => e.status === 400 && e.error?.error?.type === "invalid_request_error",
  );

  // Tool use, forced by tool_choice on random weights: plain, then streamed (the SDK builds
  // the input from input_json_delta events), then the result sent back as a tool_result.
  const tools = [{ name: "get_weather", description: "Weather forecast", input_schema: weather }];
  const ask = [{ role: "user", content: "Weather in Oslo?" }];
  const used = await c.messages.create({ model, max_tokens: 80, temperature: 0, tools, tool_choice: { type: "any" }, messages: ask });
  assert.equal(used.stop_reason, "tool_use");
  const use = used.content.find((b) => b.type === "tool_use");
  assert.equal(use?.name, "get_weather");
  assert.ok(validWeather(use.input), JSON.stringify(use.input));
  const st = c.messages.stream({ model, max_tokens: 80, temperature: 0, tools, tool_choice: { type: "tool", name: "get_weather" }, messages: ask });
  const streamedUse = (await st.finalMessage()).content.find((b) => b.type === "tool_use");
  assert.ok(validWeather(streamedUse?.input ?? {}), JSON.stringify(streamedUse));
  const after = await c.messages.create({ model, max_tokens: 4, tools, messages: [...ask, { role: "assistant", content: used.content },
    { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: "3 degrees" }] }] });
  assert.equal(after.role, "assistant");
  log("anthropic", { text: msg.content[0].text, tool_use: use.input });
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

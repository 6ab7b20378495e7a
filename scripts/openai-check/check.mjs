// Drives a running triplane frontend with the official openai client:
// completions and chat, streaming and not, the model list, and an error.
// Usage: node check.mjs http://127.0.0.1:8000 MODEL
import OpenAI from "openai";

const [base, model] = process.argv.slice(2);
if (!base || !model) {
  console.error("usage: node check.mjs BASE_URL MODEL");
  process.exit(2);
}
const client = new OpenAI({ baseURL: base + "/v1", apiKey: "unused", maxRetries: 0 });
const fail = (msg) => {
  console.error("FAIL: " + msg);
  process.exit(1);
};
const words = (s) => s.trim().split(/\s+/).filter(Boolean).length;

const models = await client.models.list();
if (!models.data.some((m) => m.id === model)) fail("model list " + JSON.stringify(models.data));

const cmpl = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 5 });
if (words(cmpl.choices[0].text) !== 5 || cmpl.choices[0].finish_reason !== "length" || cmpl.usage.completion_tokens !== 5)
  fail("completion " + JSON.stringify(cmpl));

const chat = await client.chat.completions.create({
  model,
  messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Hello!" }],
  max_tokens: 4,
});
if (chat.choices[0].message.role !== "assistant" || words(chat.choices[0].message.content) !== 4)
  fail("chat " + JSON.stringify(chat));

let text = "";
let finish = null;
const cs = await client.completions.create({ model, prompt: "Stream this", max_tokens: 7, stream: true });
for await (const ev of cs) {
  text += ev.choices[0]?.text ?? "";
  finish = ev.choices[0]?.finish_reason ?? finish;
}
if (words(text) !== 7 || finish !== "length") fail(`streamed completion ${JSON.stringify(text)} ${finish}`);

text = "";
finish = null;
let chunks = 0;
const chs = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Stream a chat" }],
  max_tokens: 6,
  stream: true,
  stream_options: { include_usage: true },
});
let usage = null;
for await (const ev of chs) {
  chunks++;
  text += ev.choices[0]?.delta?.content ?? "";
  finish = ev.choices[0]?.finish_reason ?? finish;
  usage = ev.usage ?? usage;
}
if (words(text) !== 6 || finish !== "length" || chunks < 6 || usage?.completion_tokens !== 6)
  fail(`streamed chat ${JSON.stringify(text)} ${finish} ${chunks} ${JSON.stringify(usage)}`);

try {
  await client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] });
  fail("unknown model accepted");
} catch (e) {
  if (!(e instanceof OpenAI.NotFoundError) || !String(e.message).includes("does not exist")) fail("unknown model error " + e);
}
try {
  await client.completions.create({ model, prompt: "x", max_tokens: 0 });
  fail("max_tokens 0 accepted");
} catch (e) {
  if (!(e instanceof OpenAI.BadRequestError)) fail("bad request error " + e);
}
console.log("openai client: ok");

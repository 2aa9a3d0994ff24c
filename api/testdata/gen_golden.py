"""Renders the chat templates in this directory with Python's Jinja2 the way Hugging Face's
apply_chat_template does (sandboxed, trim_blocks, lstrip_blocks, raise_exception,
strftime_now at a fixed date), into golden.json for api's template tests.
Run: python3 gen_golden.py"""
import datetime, json
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.exceptions import TemplateError

def raise_exception(msg):
    raise TemplateError(msg)

def strftime_now(fmt):
    return datetime.datetime(2025, 3, 7, 10, 4, 5).strftime(fmt)

def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now

conversations = {
    "single": [{"role": "user", "content": "Hello there"}],
    "system": [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi\n"}],
    "multi": [
        {"role": "system", "content": "You are Strata."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>easy</think>\n4"},
        {"role": "user", "content": "And \"3+3\"? Use {braces} & <tags>."},
    ],
    "unicode": [{"role": "user", "content": "Grüße, 世界! 🚀"}],
    "not_alternating": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}
templates = ["llama3.jinja", "llama3.2.jinja", "alternating.jinja", "qwen-namespace.jinja"]
out = []
for t in templates:
    src = open(t).read()
    tpl = env.from_string(src)
    for name, msgs in conversations.items():
        case = {"template": t, "conversation": name, "messages": msgs,
                "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        try:
            case["output"] = tpl.render(messages=msgs, add_generation_prompt=True,
                                        bos_token=case["bos_token"], eos_token=case["eos_token"])
        except TemplateError as e:
            case["error"] = str(e)
        out.append(case)
json.dump(out, open("golden.json", "w"), indent=1, ensure_ascii=False)
print(len(out), "cases")

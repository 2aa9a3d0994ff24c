"""Renders gpt-oss's chat template (from ../shared/conformance) with Python's Jinja2 as apply_chat_template does,
into gpt-oss-golden.json for TestGptOSSTemplate. Run from the repository root: python3 api/testdata/gen_gpt_oss_golden.py"""
import datetime, json, sys
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.exceptions import TemplateError
def raise_exception(msg): raise TemplateError(msg)
def strftime_now(fmt): return datetime.datetime(2025, 3, 7, 10, 4, 5).strftime(fmt)
def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now
src = open("../shared/conformance/chat-templates/openai-gpt-oss-120b.jinja").read()
weather = {"type":"object","properties":{"city":{"type":"string","description":""},"days":{"type":"integer","description":""}},"required":["city","days"]}
tools = [{"type":"function","function":{"name":"get_weather","description":"Weather forecast","parameters":weather}}]
call = {"id":"c1","type":"function","function":{"name":"get_weather","arguments":{"city":"Oslo","days":2}},"name":"get_weather","arguments":{"city":"Oslo","days":2}}
cases = [
  {"name":"plain","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello"}],"tools":None},
  {"name":"tools","messages":[{"role":"user","content":"Weather in Oslo?"},{"role":"assistant","content":"","tool_calls":[call]},{"role":"tool","tool_call_id":"c1","content":"{\"temp\": 3}"}],"tools":tools},
]
out = []
for c in cases:
    kw = dict(messages=c["messages"], add_generation_prompt=True, bos_token="<|startoftext|>", eos_token="<|return|>")
    if c["tools"]: kw["tools"] = c["tools"]
    c["output"] = env.from_string(src).render(**kw)
    out.append(c)
json.dump(out, open("api/testdata/gpt-oss-golden.json","w"), indent=1, ensure_ascii=False)


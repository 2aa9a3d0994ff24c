package grammar

import (
	"encoding/json"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
)

// byteVocab has one token per byte (ids 0..255), some multi-byte JSON fragments after them,
// and EOS last.
func byteVocab(extra ...string) (*Vocab, int32) {
	var toks [][]byte
	for b := range 256 {
		toks = append(toks, []byte{byte(b)})
	}
	for _, e := range extra {
		toks = append(toks, []byte(e))
	}
	eos := int32(len(toks))
	toks = append(toks, nil)
	return NewVocab(toks, []int32{eos}), eos
}

var fragments = []string{`{"`, `":`, `", "`, `"}`, `true`, `false`, `null`, `name`, `age`, ` `, "\n  ", `[`, `],`, `},`, `123`, `0.5`, `e+`, `\u00e9`, `é`, `"a`, `b"`, `":"`, `,"`, `1,`, `]}`}

func matches(t *testing.T, g *Grammar, s string) (ok, complete bool) {
	t.Helper()
	v, _ := byteVocab()
	m := NewConstraint(g, v).Matcher()
	for i := 0; i < len(s); i++ {
		if err := m.Accept(int32(s[i])); err != nil {
			return false, false
		}
	}
	return true, m.Complete()
}

func mustSchema(t testing.TB, s string) *Grammar {
	t.Helper()
	g, err := FromSchema([]byte(s))
	if err != nil {
		t.Fatalf("FromSchema(%s): %v", s, err)
	}
	return g
}

const personSchema = `{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},"tags":{"type":"array","items":{"type":"string","enum":["a","b","ab"]},"maxItems":3},"ok":{"type":"boolean"},"x":{"anyOf":[{"type":"number"},{"type":"null"}]}},"required":["name","age","tags","ok","x"],"additionalProperties":false}`

func TestMatchStrings(t *testing.T) {
	obj := JSONObject()
	person := mustSchema(t, personSchema)
	opt := mustSchema(t, `{"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"string","minLength":2,"maxLength":3},"c":{"const":10}},"required":["b"]}`)
	rec := mustSchema(t, `{"$defs":{"n":{"type":"object","properties":{"v":{"type":"integer"},"next":{"anyOf":[{"$ref":"#/$defs/n"},{"type":"null"}]}},"required":["v","next"],"additionalProperties":false}},"$ref":"#/$defs/n"}`)
	tests := []struct {
		g        *Grammar
		s        string
		ok, done bool
	}{
		{obj, `{}`, true, true},
		{obj, `{"a": [1, -2.5e+3, "x\n\u00e9", true, null, {"b": {}}]}`, true, true},
		{obj, "{\n  \"a\": 1\n}", true, true},
		{obj, `{"a":1`, true, false},
		{obj, `[]`, false, false},
		{obj, `{  }`, false, false}, // two spaces: whitespace is bounded
		{obj, `{"a":01}`, false, false},
		{obj, "{\"a\":\"\x01\"}", false, false},
		{obj, `{"a":tru}`, false, false},
		{obj, `{} `, false, false},
		{person, `{"name":"Bo","age":42,"tags":["a","ab"],"ok":false,"x":null}`, true, true},
		{person, `{"name": "Bo", "age": -0, "tags": [], "ok": true, "x": 1.5}`, true, true},
		{person, `{"age":42`, false, false},
		{person, `{"name":"Bo","age":4.2`, false, false},
		{person, `{"name":"Bo","age":4,"tags":["c"`, false, false},
		{person, `{"name":"Bo","age":4,"tags":["a","a","a","a"`, false, false},
		{person, `{"name":"Bo","age":4,"tags":[],"ok":true}`, false, false},
		{opt, `{"b":"xy"}`, true, true},
		{opt, `{"a":1,"b":"xyz","c":10}`, true, true},
		{opt, `{"a":1,"b":"x"}`, false, false},
		{opt, `{"a":1,"b":"wxyz"}`, false, false},
		{opt, `{"a":1}`, false, false},
		{opt, `{"b":"xy","c":1}`, false, false},
		{rec, `{"v":1,"next":{"v":2,"next":null}}`, true, true},
		{rec, `{"v":1,"next":{"v":2}}`, false, false},
	}
	for _, tc := range tests {
		ok, done := matches(t, tc.g, tc.s)
		if ok != tc.ok || (ok && done != tc.done) {
			t.Errorf("%q: matched %v complete %v, want %v %v", tc.s, ok, done, tc.ok, tc.done)
		}
	}
}

func TestSchemaErrors(t *testing.T) {
	for _, s := range []string{`{"type":"frob"}`, `{"$ref":"#/$defs/none"}`, `{"$ref":"http://x/y"}`, `[1]`, `{"type":"object","required":["a"]}`, `{"enum":[]}`, `{`, `false`} {
		if _, err := FromSchema([]byte(s)); !errors.Is(err, ErrSchema) {
			t.Errorf("FromSchema(%s) = %v, want ErrSchema", s, err)
		}
	}
	if g, err := FromOllamaFormat(json.RawMessage(`"json"`)); err != nil || g == nil {
		t.Errorf(`FromOllamaFormat("json") = %v, %v`, g, err)
	}
	if g, err := FromOllamaFormat(nil); err != nil || g != nil {
		t.Errorf(`FromOllamaFormat(nil) = %v, %v`, g, err)
	}
	if _, err := FromOllamaFormat(json.RawMessage(`"xml"`)); err == nil {
		t.Error(`FromOllamaFormat("xml") succeeded`)
	}
}

var walkSchemas = []string{
	personSchema,
	`{"type":"object","properties":{"items":{"type":"array","items":{"type":"object","properties":{"id":{"type":"integer"},"label":{"type":"string","maxLength":8}},"required":["id","label"],"additionalProperties":false},"minItems":1}},"required":["items"],"additionalProperties":false}`,
	`{"type":"object","properties":{"color":{"enum":["red","green","blue"]},"n":{"type":["integer","null"]}},"required":["color","n"],"additionalProperties":false}`,
	`{"type":"object","additionalProperties":{"type":"number"}}`,
	`{"$defs":{"t":{"type":"object","properties":{"k":{"type":"array","items":{"$ref":"#/$defs/t"},"maxItems":2}},"required":["k"],"additionalProperties":false}},"$ref":"#/$defs/t"}`,
}

// walk samples uniformly among allowed tokens with a budget, as a random-weight model
// would, and returns the text.
func walk(t *testing.T, c *Constraint, v *Vocab, eos int32, rng *rand.Rand, budget int) string {
	t.Helper()
	m := c.Matcher()
	var out strings.Builder
	for left := budget; ; left-- {
		if left == 0 {
			if m.Complete() { // the budget may end exactly with the value
				return out.String()
			}
			t.Fatalf("budget of %d tokens ran out at %q", budget, out.String())
		}
		mask := m.Mask(left)
		var allowed []int32
		for id := range v.Size() {
			if mask[id/64]&(1<<(uint(id)%64)) != 0 {
				allowed = append(allowed, int32(id))
			}
		}
		if len(allowed) == 0 {
			t.Fatalf("no token allowed after %q", out.String())
		}
		tok := allowed[rng.IntN(len(allowed))]
		if m.Complete() && rng.IntN(3) == 0 {
			tok = eos
		}
		if err := m.Accept(tok); err != nil {
			t.Fatalf("accept after %q: %v", out.String(), err)
		}
		if tok == eos {
			return out.String()
		}
		out.Write(v.bytes[tok])
	}
}

func TestRandomWalksValidate(t *testing.T) {
	v, eos := byteVocab(fragments...)
	for i, s := range walkSchemas {
		c := NewConstraint(mustSchema(t, s), v)
		for seed := range uint64(20) {
			rng := rand.New(rand.NewPCG(seed, uint64(i)))
			budget := 60 + int(seed)*10
			text := walk(t, c, v, eos, rng, budget)
			if err := testkit.ValidateJSON([]byte(s), []byte(text)); err != nil {
				t.Errorf("schema %d seed %d: %v", i, seed, err)
			}
		}
	}
	c := NewConstraint(JSONObject(), v)
	for seed := range uint64(20) {
		text := walk(t, c, v, eos, rand.New(rand.NewPCG(seed, 99)), 80)
		if err := testkit.ValidateJSON([]byte(`{"type":"object"}`), []byte(text)); err != nil {
			t.Errorf("json_object seed %d: %v", seed, err)
		}
	}
}

func TestSequence(t *testing.T) {
	g, err := Sequence(Text("<tool_call>\n"), Value([]byte(`{"type":"object","properties":{"name":{"const":"f"},"arguments":{"type":"object","properties":{"q":{"type":"string"}},"required":["q"],"additionalProperties":false}},"required":["name","arguments"],"additionalProperties":false}`)), Text("\n</tool_call>"))
	if err != nil {
		t.Fatal(err)
	}
	if ok, done := matches(t, g, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": \"x\"}}\n</tool_call>"); !ok || !done {
		t.Errorf("tool call: matched %v complete %v", ok, done)
	}
	if ok, _ := matches(t, g, "<tool_call>\n{\"name\": \"g\""); ok {
		t.Error("wrong function name matched")
	}
}

func TestUnsatisfiableRecursion(t *testing.T) {
	for _, s := range []string{`{"$ref":"#"}`, `{"$defs":{"a":{"$ref":"#/$defs/a"}},"$ref":"#/$defs/a"}`,
		`{"type":"object","properties":{"next":{"$ref":"#"}},"required":["next"]}`} {
		if _, err := FromSchema([]byte(s)); !errors.Is(err, ErrSchema) {
			t.Errorf("FromSchema(%s) = %v, want ErrSchema", s, err)
		}
	}
}

// FuzzSchema: any schema either fails to compile with ErrSchema or gives a matcher that
// takes any bytes, masks and budgets without panicking, and whose complete matches are JSON.
func FuzzSchema(f *testing.F) {
	for _, s := range append(walkSchemas, personSchema, `{"type":"object"}`, `{"enum":[1,10,"a"]}`) {
		f.Add([]byte(s), []byte(`{"name":"x","age":1}`), uint8(9))
	}
	v, _ := byteVocab(fragments...)
	f.Fuzz(func(t *testing.T, schema, text []byte, budget uint8) {
		g, err := FromSchema(schema)
		if err != nil {
			if !errors.Is(err, ErrSchema) {
				t.Fatalf("error %v is not ErrSchema", err)
			}
			return
		}
		m := NewConstraint(g, v).Matcher()
		for _, c := range text {
			m.Mask(int(budget))
			if m.Accept(int32(c)) != nil {
				return
			}
		}
		if m.Complete() && !json.Valid(text) {
			t.Fatalf("complete match %q is not JSON", text)
		}
	})
}

// An anyOf that refers to itself expands to its concrete alternatives once: no user schema
// makes the matcher's work grow exponentially.
func TestRecursiveAnyOf(t *testing.T) {
	g := mustSchema(t, `{"anyOf":[{"$ref":"#"},{"$ref":"#"},{"type":"null"},{"type":"array","items":{"$ref":"#"}}]}`)
	for _, s := range []string{`null`, `[null,[[null]],[]]`} {
		if ok, done := matches(t, g, s); !ok || !done {
			t.Errorf("%s: matched %v complete %v", s, ok, done)
		}
	}
}

func TestNestingBounded(t *testing.T) {
	deep := strings.Repeat("[", maxNesting-1) + strings.Repeat("]", maxNesting-1)
	if ok, done := matches(t, JSONObject(), `{"a":`+deep+`}`); !ok || !done {
		t.Errorf("nesting %d: matched %v complete %v", maxNesting, ok, done)
	}
	if ok, _ := matches(t, JSONObject(), `{"a":[`+deep); ok {
		t.Errorf("nesting past %d matched", maxNesting)
	}
}

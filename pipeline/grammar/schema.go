// Package grammar constrains generation to JSON: it compiles a JSON schema (the subset
// OpenAI's structured outputs accept) or "any JSON object" into a byte-level pushdown
// matcher, and, given the vocabulary's token byte strings, yields the tokens each step may
// take. The generator masks the logits with it, so even a model with random weights can only
// write text that parses and validates.
//
// Deliberate narrowings of JSON, so that every generation ends: whitespace between tokens is
// either nothing, one space, or a newline followed by at most 20 spaces or tabs (as
// llama.cpp's JSON grammar); numbers have at most 16 integer, 16 fraction and 3 exponent
// digits; an object's declared properties come in the schema's order (as OpenAI's strict
// mode writes them); and a budget (Matcher.Mask) keeps the value completable within the tokens
// left. Not enforced: pattern, format, minimum/maximum, multipleOf, uniqueItems.
package grammar

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
)

type kind uint8

const (
	kObject kind = iota
	kArray
	kString
	kNumber
	kLiteral
	kAnyOf
	kSeq
)

// node is a compiled schema: an immutable graph (cyclic where $ref recurses).
type node struct {
	id      int
	kind    kind
	key     *node    // kObject with free keys: the keys' string node
	nextReq []int    // kObject: for each property index, the first required one at or after it
	props   []prop   // kObject: declared properties in order
	extra   *node    // kObject with no declared properties: values of its free keys
	items   *node    // kArray
	minN    int      // kArray: minItems; kString: minLength
	maxN    int      // kArray: maxItems; kString: maxLength; -1: none
	integer bool     // kNumber
	lits    [][]byte // kLiteral: JSON encodings, sorted
	alts    []*node  // kAnyOf: the alternatives as written
	flat    []*node  // kAnyOf: the concrete nodes it may be (see flatten)
	parts   []part   // kSeq: the root: literals and values in a row
	minLen  int      // fewest bytes a value of this node takes
}

type prop struct {
	key      []byte // `"name"` as JSON
	n        *node
	required bool
}

type part struct {
	lit []byte
	n   *node
}

// Grammar is a compiled constraint: immutable and safe to share between generations.
type Grammar struct {
	root  *node
	nodes []*node
	key   string // what it was compiled from, so that equal requests share mask caches
}

// Key identifies the grammar by what it was compiled from: equal keys, equal grammars.
func (g *Grammar) Key() string { return g.key }

// ErrSchema marks a schema this package cannot compile.
var ErrSchema = errors.New("unsupported JSON schema")

const inf = math.MaxInt32 / 4

type compiler struct {
	nodes  []*node
	defs   any // the schema document, for $ref
	refs   map[string]*node
	any    *node
	strNod *node
	depth  int
}

func (c *compiler) newNode(k kind) *node {
	n := &node{id: len(c.nodes), kind: k, maxN: -1}
	c.nodes = append(c.nodes, n)
	return n
}

// anyValue is the node for any JSON value.
func (c *compiler) anyValue() *node {
	if c.any != nil {
		return c.any
	}
	a := c.newNode(kAnyOf)
	c.any = a
	obj := c.newNode(kObject)
	obj.extra = a
	obj.key = c.str()
	arr := c.newNode(kArray)
	arr.items = a
	a.alts = []*node{obj, arr, c.str(), c.num(false), c.lit("true", "false", "null")}
	return a
}

func (c *compiler) str() *node {
	if c.strNod == nil {
		c.strNod = c.newNode(kString)
	}
	return c.strNod
}

func (c *compiler) num(integer bool) *node {
	n := c.newNode(kNumber)
	n.integer = integer
	return n
}

func (c *compiler) lit(vals ...string) *node {
	n := c.newNode(kLiteral)
	for _, v := range vals {
		n.lits = append(n.lits, []byte(v))
	}
	sortLits(n.lits)
	return n
}

func sortLits(l [][]byte) { slices.SortFunc(l, bytes.Compare) }

// JSONObject is any JSON object, as OpenAI's response_format {"type": "json_object"} and
// Ollama's format "json" ask for.
func JSONObject() *Grammar {
	c := &compiler{refs: map[string]*node{}}
	a := c.anyValue()
	root := c.newNode(kSeq)
	root.parts = []part{{n: a.alts[0]}}
	gr := c.finish(root)
	gr.key = "json_object"
	return gr
}

// FromSchema compiles a JSON schema.
func FromSchema(schema []byte) (*Grammar, error) {
	return Sequence(Value(schema))
}

// FromOllamaFormat compiles Ollama's "format" field: "json" for any JSON object, or a JSON
// schema. An absent, null or empty format returns nil and no error: nothing to constrain.
func FromOllamaFormat(raw json.RawMessage) (*Grammar, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" || string(raw) == `""` {
		return nil, nil
	}
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("format: %w", err)
		}
		if s != "json" {
			return nil, fmt.Errorf("%w: format %q: expected \"json\" or a JSON schema", ErrSchema, s)
		}
		return JSONObject(), nil
	}
	return FromSchema(raw)
}

// Piece is one part of a Sequence: fixed text, or a value matching a schema.
type Piece struct {
	text   string
	schema []byte
	isVal  bool
}

// Text is fixed text in a Sequence.
func Text(s string) Piece { return Piece{text: s} }

// Value is a JSON value matching schema in a Sequence; an empty schema is any JSON value.
func Value(schema []byte) Piece { return Piece{schema: schema, isVal: true} }

// Sequence compiles pieces written one after another with nothing between them: a tool
// call in a model's own syntax is Text("<tool_call>\n"), Value(call), Text("\n</tool_call>").
func Sequence(pieces ...Piece) (*Grammar, error) {
	c := &compiler{refs: map[string]*node{}}
	root := c.newNode(kSeq)
	var key bytes.Buffer
	for _, p := range pieces {
		fmt.Fprintf(&key, "%v:%d:%s:%d:%s;", p.isVal, len(p.text), p.text, len(p.schema), p.schema)
		if !p.isVal {
			if p.text != "" {
				root.parts = append(root.parts, part{lit: []byte(p.text)})
			}
			continue
		}
		if len(bytes.TrimSpace(p.schema)) == 0 {
			root.parts = append(root.parts, part{n: c.anyValue()})
			continue
		}
		doc, err := parseOrdered(p.schema)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrSchema, err)
		}
		c.defs = doc
		c.refs = map[string]*node{}
		n, err := c.compile(doc, "#")
		if err != nil {
			return nil, err
		}
		root.parts = append(root.parts, part{n: n})
	}
	gr := c.finish(root)
	gr.key = key.String()
	for _, p := range root.parts {
		if p.n != nil && p.n.minLen >= inf {
			return nil, fmt.Errorf("%w: the schema admits no finite value (a $ref that must recurse forever)", ErrSchema)
		}
	}
	return gr, nil
}

func (c *compiler) finish(root *node) *Grammar {
	for _, n := range c.nodes {
		if n.kind == kAnyOf {
			n.flat = flatten(n)
		}
	}
	computeMinLen(c.nodes)
	return &Grammar{root: root, nodes: c.nodes}
}

// omap is a JSON object that remembers its key order: properties are generated in it.
type omap struct {
	keys []string
	vals map[string]any
}

func (o *omap) get(k string) (any, bool) {
	v, ok := o.vals[k]
	return v, ok
}

func parseOrdered(b []byte) (any, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	v, err := parseValue(d)
	if err != nil {
		return nil, err
	}
	if _, err := d.Token(); err != io.EOF {
		return nil, errors.New("trailing data after the schema")
	}
	return v, nil
}

func parseValue(d *json.Decoder) (any, error) {
	t, err := d.Token()
	if err != nil {
		return nil, err
	}
	switch t := t.(type) {
	case json.Delim:
		switch t {
		case '{':
			o := &omap{vals: map[string]any{}}
			for d.More() {
				kt, err := d.Token()
				if err != nil {
					return nil, err
				}
				k, _ := kt.(string)
				v, err := parseValue(d)
				if err != nil {
					return nil, err
				}
				if _, dup := o.vals[k]; !dup {
					o.keys = append(o.keys, k)
				}
				o.vals[k] = v
			}
			_, err := d.Token()
			return o, err
		case '[':
			var a []any
			for d.More() {
				v, err := parseValue(d)
				if err != nil {
					return nil, err
				}
				a = append(a, v)
			}
			_, err := d.Token()
			return a, err
		}
		return nil, fmt.Errorf("unexpected %v", t)
	default:
		return t, nil
	}
}

// encode writes v as compact JSON, keys in their original order, without HTML escaping.
func encode(v any) []byte {
	var b bytes.Buffer
	encodeTo(&b, v)
	return b.Bytes()
}

func encodeTo(b *bytes.Buffer, v any) {
	switch v := v.(type) {
	case *omap:
		b.WriteByte('{')
		for i, k := range v.keys {
			if i > 0 {
				b.WriteByte(',')
			}
			encodeTo(b, k)
			b.WriteByte(':')
			encodeTo(b, v.vals[k])
		}
		b.WriteByte('}')
	case []any:
		b.WriteByte('[')
		for i, x := range v {
			if i > 0 {
				b.WriteByte(',')
			}
			encodeTo(b, x)
		}
		b.WriteByte(']')
	case json.Number:
		b.WriteString(v.String())
	default:
		e := json.NewEncoder(b)
		e.SetEscapeHTML(false)
		_ = e.Encode(v)
		b.Truncate(b.Len() - 1) // Encode's newline
	}
}

const maxSchemaDepth = 64

func (c *compiler) compile(v any, path string) (*node, error) {
	c.depth++
	defer func() { c.depth-- }()
	if c.depth > maxSchemaDepth {
		return nil, fmt.Errorf("%w: %s: nested more than %d deep", ErrSchema, path, maxSchemaDepth)
	}
	switch v := v.(type) {
	case bool:
		if v {
			return c.anyValue(), nil
		}
		return nil, fmt.Errorf("%w: %s: the schema false admits no value", ErrSchema, path)
	case *omap:
		return c.compileObject(v, path)
	default:
		return nil, fmt.Errorf("%w: %s: a schema must be an object or a boolean", ErrSchema, path)
	}
}

func (c *compiler) compileObject(s *omap, path string) (*node, error) {
	if ref, ok := s.get("$ref"); ok {
		r, _ := ref.(string)
		return c.resolve(r, path)
	}
	if v, ok := s.get("const"); ok {
		return c.literals([]any{v}), nil
	}
	if v, ok := s.get("enum"); ok {
		vals, _ := v.([]any)
		if len(vals) == 0 {
			return nil, fmt.Errorf("%w: %s: enum must be a non-empty array", ErrSchema, path)
		}
		return c.literals(vals), nil
	}
	for _, k := range []string{"anyOf", "oneOf"} {
		if v, ok := s.get(k); ok {
			list, _ := v.([]any)
			if len(list) == 0 {
				return nil, fmt.Errorf("%w: %s: %s must be a non-empty array", ErrSchema, path, k)
			}
			var alts []*node
			for i, sub := range list {
				n, err := c.compile(sub, fmt.Sprintf("%s/%s/%d", path, k, i))
				if err != nil {
					return nil, err
				}
				alts = append(alts, n)
			}
			return c.anyOf(alts), nil
		}
	}
	if v, ok := s.get("allOf"); ok {
		list, _ := v.([]any)
		if len(list) != 1 {
			return nil, fmt.Errorf("%w: %s: allOf is supported with exactly one schema", ErrSchema, path)
		}
		return c.compile(list[0], path+"/allOf/0")
	}
	var types []string
	switch t := mustGet(s, "type").(type) {
	case string:
		types = []string{t}
	case []any:
		for _, x := range t {
			if s, ok := x.(string); ok {
				types = append(types, s)
			}
		}
	case nil:
		switch {
		case has(s, "properties") || has(s, "additionalProperties") || has(s, "required"):
			types = []string{"object"}
		case has(s, "items"):
			types = []string{"array"}
		default:
			return c.anyValue(), nil
		}
	}
	if len(types) == 0 {
		return nil, fmt.Errorf("%w: %s: type must be a string or an array of strings", ErrSchema, path)
	}
	var alts []*node
	for _, t := range types {
		n, err := c.typed(t, s, path)
		if err != nil {
			return nil, err
		}
		alts = append(alts, n)
	}
	if len(alts) == 1 {
		return alts[0], nil
	}
	return c.anyOf(alts), nil
}

func (c *compiler) typed(t string, s *omap, path string) (*node, error) {
	switch t {
	case "string":
		n := c.newNode(kString)
		n.minN = intOr(s, "minLength", 0)
		n.maxN = intOr(s, "maxLength", -1)
		if n.maxN >= 0 && n.maxN < n.minN {
			return nil, fmt.Errorf("%w: %s: maxLength below minLength", ErrSchema, path)
		}
		return n, nil
	case "number", "integer":
		return c.num(t == "integer"), nil
	case "boolean":
		return c.lit("true", "false"), nil
	case "null":
		return c.lit("null"), nil
	case "array":
		n := c.newNode(kArray)
		n.minN = intOr(s, "minItems", 0)
		n.maxN = intOr(s, "maxItems", -1)
		if n.maxN >= 0 && n.maxN < n.minN {
			return nil, fmt.Errorf("%w: %s: maxItems below minItems", ErrSchema, path)
		}
		if it, ok := s.get("items"); ok {
			item, err := c.compile(it, path+"/items")
			if err != nil {
				return nil, err
			}
			n.items = item
		} else {
			n.items = c.anyValue()
		}
		return n, nil
	case "object":
		return c.object(s, path)
	}
	return nil, fmt.Errorf("%w: %s: unknown type %q", ErrSchema, path, t)
}

func (c *compiler) object(s *omap, path string) (*node, error) {
	n := c.newNode(kObject)
	req := map[string]bool{}
	if r, ok := s.get("required"); ok {
		list, _ := r.([]any)
		for _, x := range list {
			if k, ok := x.(string); ok {
				req[k] = true
			}
		}
	}
	props, _ := mustGet(s, "properties").(*omap)
	if props != nil {
		for _, k := range props.keys {
			pn, err := c.compile(props.vals[k], path+"/properties/"+k)
			if err != nil {
				return nil, err
			}
			n.props = append(n.props, prop{key: encode(k), n: pn, required: req[k]})
		}
	}
	for k := range req {
		if props == nil || !has(props, k) {
			return nil, fmt.Errorf("%w: %s: required property %q is not among the properties", ErrSchema, path, k)
		}
	}
	n.nextReq = make([]int, len(n.props))
	next := len(n.props) - 1
	for i := len(n.props) - 1; i >= 0; i-- {
		if n.props[i].required {
			next = i
		}
		n.nextReq[i] = next
	}
	if len(n.props) == 0 {
		n.key = c.str()
		// Free keys. additionalProperties: a schema for their values, false for none at all.
		switch ap := mustGet(s, "additionalProperties").(type) {
		case bool:
			if ap {
				n.extra = c.anyValue()
			}
		case *omap:
			x, err := c.compile(ap, path+"/additionalProperties")
			if err != nil {
				return nil, err
			}
			n.extra = x
		default:
			n.extra = c.anyValue()
		}
	}
	return n, nil
}

func (c *compiler) resolve(ref, path string) (*node, error) {
	if n, ok := c.refs[ref]; ok {
		return n, nil
	}
	if ref != "#" && !strings.HasPrefix(ref, "#/") {
		return nil, fmt.Errorf("%w: %s: only local $ref (#/...) are supported, not %q", ErrSchema, path, ref)
	}
	var cur any = c.defs
	if ref != "#" {
		for _, seg := range strings.Split(ref[2:], "/") {
			seg = strings.ReplaceAll(strings.ReplaceAll(seg, "~1", "/"), "~0", "~")
			o, ok := cur.(*omap)
			if !ok {
				return nil, fmt.Errorf("%w: %s: $ref %q does not resolve", ErrSchema, path, ref)
			}
			if cur, ok = o.get(seg); !ok {
				return nil, fmt.Errorf("%w: %s: $ref %q does not resolve", ErrSchema, path, ref)
			}
		}
	}
	// A placeholder breaks cycles: a recursive reference points at it, and it takes the
	// compiled node's shape once that is known.
	ph := c.newNode(kAnyOf)
	c.refs[ref] = ph
	n, err := c.compile(cur, ref)
	if err != nil {
		return nil, err
	}
	id := ph.id
	*ph = *n
	ph.id = id
	return ph, nil
}

func (c *compiler) literals(vals []any) *node {
	n := c.newNode(kLiteral)
	for _, v := range vals {
		n.lits = append(n.lits, encode(v))
	}
	slices.SortFunc(n.lits, bytes.Compare)
	n.lits = slices.CompactFunc(n.lits, bytes.Equal)
	return n
}

// anyOf flattens nested alternatives so that a frame on the stack is always concrete.
// flatten lists the concrete nodes an anyOf may be, each once, following nested anyOf (and
// $ref cycles through them) without looping: a user's schema must not make the matcher
// expand alternatives exponentially.
func flatten(n *node) []*node {
	seen := map[*node]bool{n: true}
	var out []*node
	var visit func(x *node)
	visit = func(x *node) {
		if seen[x] {
			return
		}
		seen[x] = true
		if x.kind != kAnyOf {
			out = append(out, x)
			return
		}
		for _, a := range x.alts {
			visit(a)
		}
	}
	for _, a := range n.alts {
		visit(a)
	}
	return out
}

func (c *compiler) anyOf(alts []*node) *node {
	n := c.newNode(kAnyOf)
	n.alts = alts // flattened lazily in expand: placeholders may still change shape
	return n
}

func mustGet(s *omap, k string) any {
	v, _ := s.get(k)
	return v
}

func has(s *omap, k string) bool {
	_, ok := s.get(k)
	return ok
}

func intOr(s *omap, k string, def int) int {
	v, ok := s.get(k)
	if !ok {
		return def
	}
	num, ok := v.(json.Number)
	if !ok {
		return def
	}
	i, err := num.Int64()
	if err != nil || i < 0 || i > 1<<20 {
		return def
	}
	return int(i)
}

// computeMinLen finds each node's shortest value by relaxation: recursion through $ref
// makes the graph cyclic, and a cycle that must recurse has no finite value (inf).
func computeMinLen(nodes []*node) {
	for _, n := range nodes {
		n.minLen = inf
	}
	for changed := true; changed; {
		changed = false
		for _, n := range nodes {
			if l := n.shortest(); l < n.minLen {
				n.minLen, changed = l, true
			}
		}
	}
}

func (n *node) shortest() int {
	switch n.kind {
	case kObject:
		return n.objRest(0, true) + 1
	case kArray:
		return n.arrRest(0, true) + 1
	case kString:
		return 2 + n.minN
	case kNumber:
		return 1
	case kLiteral:
		m := inf
		for _, l := range n.lits {
			m = min(m, len(l))
		}
		return m
	case kAnyOf:
		m := inf
		for _, a := range n.flat {
			m = min(m, a.minLen)
		}
		return m
	case kSeq:
		return n.seqRest(0, 0)
	}
	return inf
}

// objRest is the fewest bytes after an object's opening brace (first) or after a value,
// with properties from i on still to come, up to and including the closing brace.
func (n *node) objRest(i int, first bool) int {
	total := 1
	for j := i; j < len(n.props); j++ {
		p := n.props[j]
		if !p.required {
			continue
		}
		total = sat(total + len(p.key) + 1 + p.n.minLen)
		if !first {
			total++
		}
		first = false
	}
	return total
}

func (n *node) arrRest(count int, first bool) int {
	need := max(0, n.minN-count)
	if need == 0 {
		return 1
	}
	per := sat(n.items.minLen + 1)
	total := sat(need*per + 1)
	if first {
		total--
	}
	return total
}

func (n *node) seqRest(i, pos int) int {
	total := 0
	for j := i; j < len(n.parts); j++ {
		p := n.parts[j]
		if p.n != nil {
			total = sat(total + p.n.minLen)
		} else {
			total += len(p.lit)
			if j == i {
				total -= pos
			}
		}
	}
	return total
}

func sat(x int) int { return min(x, inf) }

package api

import "strings"

// gonja (the Jinja engine here) cannot parse a conditional expression inside parentheses:
// `{{ (a if c else b) + "x" }}` fails with "Unbalanced parenthesis", while `{{ a if c else b }}`
// and `{{ (a) + "x" }}` parse. gpt-oss's chat template writes one (the tool call's content
// type), so the whole template failed to parse. Before parsing, each output tag holding such a
// group is rewritten into an if statement over two copies of the tag, one per branch:
//
//	{{- (A if C else B) + "x" }}  ->  {%- if C %}{{ (A) + "x" }}{% else %}{{ (B) + "x" }}{% endif %}
//
// which renders the same: expressions have no side effects, so evaluating C first changes
// nothing. The statement tags keep the output tag's whitespace control, and a newline after
// the tag is doubled where trim_blocks would eat one after {% endif %}. Conditionals in
// statement tags ({% set %}) are left as they are: no known template needs them.

// maxTemplateRewrites bounds the rewrites of one template (each removes one group), so a
// pathological template cannot make parsing quadratic without end.
const maxTemplateRewrites = 64

// rewriteParenConditionals applies the rewrite above to every output tag that needs it.
func rewriteParenConditionals(src string) string {
	for range maxTemplateRewrites {
		out, ok := rewriteOne(src)
		if !ok {
			return src
		}
		src = out
	}
	return src
}

// rewriteOne rewrites the first output tag with a parenthesized conditional.
func rewriteOne(src string) (string, bool) {
	for from := 0; ; {
		i := strings.Index(src[from:], "{{")
		if i < 0 {
			return src, false
		}
		start := from + i
		end := tagEnd(src, start+2)
		if end < 0 {
			return src, false
		}
		bodyStart, bodyEnd := start+2, end // body between the delimiters
		lstrip, rstrip := false, false
		if bodyStart < bodyEnd && (src[bodyStart] == '-' || src[bodyStart] == '+') {
			lstrip = src[bodyStart] == '-'
			bodyStart++
		}
		if bodyEnd > bodyStart && src[bodyEnd-1] == '-' {
			rstrip = true
			bodyEnd--
		}
		body := src[bodyStart:bodyEnd]
		if open, close, a, c, b, ok := parenConditional(body); ok {
			pre, post := body[:open], body[close+1:]
			var r strings.Builder
			r.WriteString("{%")
			if lstrip {
				r.WriteString("-")
			} else {
				r.WriteString("+") // keep lstrip_blocks off, as for the output tag
			}
			r.WriteString(" if " + c + " %}{{ " + pre + "(" + a + ")" + post + " }}{% else %}{{ " + pre + "(" + b + ")" + post + " }}{% endif ")
			after := end + 2
			if rstrip {
				r.WriteString("-%}")
			} else {
				r.WriteString("%}")
				if after < len(src) && src[after] == '\n' {
					r.WriteString("\n") // trim_blocks eats one newline after a block tag
				}
			}
			return src[:start] + r.String() + src[after:], true
		}
		from = end + 2
	}
}

// tagEnd is the index of the "}}" closing a tag whose body starts at i, skipping string
// literals; -1 if none.
func tagEnd(src string, i int) int {
	for i < len(src)-1 {
		switch c := src[i]; {
		case c == '"' || c == '\'':
			j := strings.IndexByte(src[i+1:], c)
			if j < 0 {
				return -1
			}
			i += j + 2
		case c == '}' && src[i+1] == '}':
			return i
		default:
			i++
		}
	}
	return -1
}

// parenConditional finds the first parenthesized group of expr whose own top level is a
// conditional "A if C else B", returning the parentheses' indices and the three parts.
func parenConditional(expr string) (open, close int, a, c, b string, ok bool) {
	var stack []int
	for i := 0; i < len(expr); i++ {
		switch ch := expr[i]; ch {
		case '"', '\'':
			j := strings.IndexByte(expr[i+1:], ch)
			if j < 0 {
				return 0, 0, "", "", "", false
			}
			i += j + 1
		case '(':
			stack = append(stack, i)
		case ')':
			if len(stack) == 0 {
				return 0, 0, "", "", "", false
			}
			o := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			if a, c, b, ok := splitConditional(expr[o+1 : i]); ok {
				return o, i, a, c, b, true
			}
		}
	}
	return 0, 0, "", "", "", false
}

// splitConditional splits "A if C else B" at its top-level keywords (outside strings and
// brackets).
func splitConditional(s string) (a, c, b string, ok bool) {
	ifAt, elseAt := -1, -1
	depth := 0
	for i := 0; i < len(s); i++ {
		switch ch := s[i]; ch {
		case '"', '\'':
			j := strings.IndexByte(s[i+1:], ch)
			if j < 0 {
				return "", "", "", false
			}
			i += j + 1
		case '(', '[', '{':
			depth++
		case ')', ']', '}':
			depth--
		default:
			if depth != 0 || (i > 0 && !isSpace(s[i-1])) {
				continue
			}
			switch {
			case ifAt < 0 && keywordAt(s, i, "if"):
				ifAt = i
			case ifAt >= 0 && elseAt < 0 && keywordAt(s, i, "else"):
				elseAt = i
			}
		}
	}
	if ifAt <= 0 || elseAt < 0 {
		return "", "", "", false
	}
	a, c, b = strings.TrimSpace(s[:ifAt]), strings.TrimSpace(s[ifAt+2:elseAt]), strings.TrimSpace(s[elseAt+4:])
	return a, c, b, a != "" && c != "" && b != ""
}

func keywordAt(s string, i int, kw string) bool {
	return strings.HasPrefix(s[i:], kw) && i+len(kw) < len(s) && isSpace(s[i+len(kw)])
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

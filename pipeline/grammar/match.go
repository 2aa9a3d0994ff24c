package grammar

// The matcher is a pushdown automaton over bytes. A stack's top frame is a value type and
// its parents a persistent linked list, so advancing a copy of a stack by a byte allocates
// only when it pushes: the trie walk in Mask advances hundreds of thousands of copies.

// frame is one value being written: its node, where in it the writer is, and counters.
type frame struct {
	n  *node
	st uint8 // state within the node (see feed)
	ws uint8 // whitespace run in the current gap: 0 none, 1 one space, 2+k newline and k blanks
	a  int32 // object: next property / key candidate; array: items; string: runes; number: digits; literal: candidate
	b  int32 // key or literal: bytes matched; string: bytes left in an escape or UTF-8 sequence
}

type link struct {
	f    frame
	next *link
}

type stack struct {
	top   frame
	rest  *link
	depth int32 // frames below top
}

// maxNesting bounds how deep values nest (as JSON parsers commonly do), which also bounds
// the per-token work of a state and the size of its cache key.
const maxNesting = 64

// maxAlts bounds the stacks an ambiguous anyOf may keep alive at once; beyond it the later
// alternatives are dropped (a schema that needs more is not one a model could follow either).
const maxAlts = 32

// Frame states.
const (
	stStart = 0

	objOpen    = 1 // after '{'
	objKey     = 2 // inside a declared key (a: candidate, b: bytes matched)
	objAfterK  = 3 // after a key, before ':'
	objColon   = 4 // after ':', before the value
	objValue   = 5 // after a value
	objComma   = 6 // after ','
	arrOpen    = 1
	arrValue   = 2
	arrComma   = 3
	strIn      = 1
	strEsc     = 2
	strHex     = 3
	strUTF8    = 4
	numMinus   = 1
	numZero    = 2
	numInt     = 3
	numDot     = 4
	numFrac    = 5
	numE       = 6
	numESign   = 7
	numExp     = 8
	litIn      = 1
	maxIntDig  = 16
	maxFracDig = 16
	maxExpDig  = 3
	maxBlanks  = 20

	// Restrictions on the first continuation byte after some UTF-8 lead bytes (frame.b>>4).
	utf8E0 = 1
	utf8ED = 2
	utf8F0 = 3
	utf8F4 = 4
)

func isWS(c byte) bool { return c == ' ' || c == '\n' || c == '\t' || c == '\r' }

// wsNext takes whitespace byte c in a gap: nothing, one space, or a newline followed by at
// most maxBlanks spaces or tabs, so that no model can loop on whitespace.
func wsNext(ws *uint8, c byte) bool {
	switch {
	case *ws == 0 && c == ' ':
		*ws = 1
	case *ws == 0 && c == '\n':
		*ws = 2
	case *ws >= 2 && (c == ' ' || c == '\t') && *ws < 2+maxBlanks:
		*ws++
	default:
		return false
	}
	return true
}

// firstOK reports whether a value of node n can begin with c.
func firstOK(n *node, c byte) bool {
	switch n.kind {
	case kObject:
		return c == '{'
	case kArray:
		return c == '['
	case kString:
		return c == '"'
	case kNumber:
		return c == '-' || (c >= '0' && c <= '9')
	case kLiteral:
		for _, l := range n.lits {
			if l[0] == c {
				return true
			}
		}
		return false
	case kAnyOf:
		for _, a := range n.flat {
			if firstOK(a, c) {
				return true
			}
		}
	}
	return false
}

func (s *stack) pop() {
	s.top = s.rest.f
	s.rest = s.rest.next
	s.depth--
}

// push starts a value of node n on s with its first byte c and appends every resulting
// stack to out (several when n has alternatives that all take c).
func push(s stack, n *node, c byte, out []stack) []stack {
	if n.kind == kAnyOf {
		for _, a := range n.flat {
			if firstOK(a, c) && len(out) < maxAlts {
				out = push(s, a, c, out)
			}
		}
		return out
	}
	if s.depth >= maxNesting {
		return out
	}
	s.rest = &link{f: s.top, next: s.rest}
	s.top = frame{n: n}
	s.depth++
	return feed(s, c, out)
}

// feed advances s by byte c and appends the stacks that result (none: c is not allowed).
func feed(s stack, c byte, out []stack) []stack {
	for {
		f := &s.top
		n := f.n
		switch n.kind {
		case kSeq:
			if int(f.a) >= len(n.parts) {
				return out
			}
			p := n.parts[f.a]
			if p.n != nil {
				if !firstOK(p.n, c) {
					return out
				}
				f.a++
				return push(s, p.n, c, out)
			}
			if p.lit[f.b] != c {
				return out
			}
			if f.b++; int(f.b) == len(p.lit) {
				f.a, f.b = f.a+1, 0
			}
			return append(out, s)

		case kObject:
			if f.st == stStart {
				if c != '{' {
					return out
				}
				f.st = objOpen
				return append(out, s)
			}
			if f.st == objKey {
				return keyByte(s, c, out)
			}
			if isWS(c) {
				if wsNext(&f.ws, c) {
					return append(out, s)
				}
				return out
			}
			f.ws = 0
			switch f.st {
			case objOpen, objComma:
				if c == '"' && objMore(n, f.a) {
					if n.props == nil { // a free key: any string
						f.st = objAfterK
						return push(s, n.key, c, out)
					}
					f.st, f.b = objKey, 1
					return append(out, s)
				}
				if c == '}' && f.st == objOpen && objClosable(n, f.a) {
					s.pop()
					return append(out, s)
				}
				return out
			case objAfterK:
				if c != ':' {
					return out
				}
				f.st = objColon
				return append(out, s)
			case objColon:
				v := objValueNode(n, f.a)
				if !firstOK(v, c) {
					return out
				}
				f.st = objValue
				return push(s, v, c, out)
			case objValue:
				if c == ',' && objMore(n, f.a) {
					f.st = objComma
					return append(out, s)
				}
				if c == '}' && objClosable(n, f.a) {
					s.pop()
					return append(out, s)
				}
				return out
			}
			return out

		case kArray:
			if f.st == stStart {
				if c != '[' {
					return out
				}
				f.st = arrOpen
				return append(out, s)
			}
			if isWS(c) {
				if wsNext(&f.ws, c) {
					return append(out, s)
				}
				return out
			}
			f.ws = 0
			switch f.st {
			case arrOpen, arrComma:
				if c == ']' && f.st == arrOpen && n.minN == 0 {
					s.pop()
					return append(out, s)
				}
				if (n.maxN >= 0 && int(f.a) >= n.maxN) || !firstOK(n.items, c) {
					return out
				}
				f.st = arrValue
				f.a++
				return push(s, n.items, c, out)
			case arrValue:
				if c == ',' && (n.maxN < 0 || int(f.a) < n.maxN) {
					f.st = arrComma
					return append(out, s)
				}
				if c == ']' && int(f.a) >= n.minN {
					s.pop()
					return append(out, s)
				}
			}
			return out

		case kString:
			switch f.st {
			case stStart:
				if c != '"' {
					return out
				}
				f.st = strIn
				return append(out, s)
			case strIn:
				if c == '"' {
					if int(f.a) < n.minN {
						return out
					}
					s.pop()
					return append(out, s)
				}
				switch {
				case c < 0x20 || c == 0x7f:
					return out // control characters must be escaped; DEL is legal but useless
				case c == '\\':
					f.st = strEsc
				case c < 0x80:
				case c >= 0xc2 && c <= 0xdf:
					f.st, f.b = strUTF8, 1
				case c >= 0xe0 && c <= 0xef:
					f.st, f.b = strUTF8, 2
					switch c { // no overlong forms, no surrogates
					case 0xe0:
						f.b |= utf8E0 << 4
					case 0xed:
						f.b |= utf8ED << 4
					}
				case c >= 0xf0 && c <= 0xf4:
					f.st, f.b = strUTF8, 3
					switch c { // no overlong forms, nothing past U+10FFFF
					case 0xf0:
						f.b |= utf8F0 << 4
					case 0xf4:
						f.b |= utf8F4 << 4
					}
				default:
					return out
				}
				if n.minN > 0 || n.maxN >= 0 { // count only where it matters: masks are cached by state
					if n.maxN >= 0 && int(f.a) >= n.maxN {
						return out
					}
					f.a++
				}
				return append(out, s)
			case strEsc:
				switch c {
				case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
					f.st = strIn
				case 'u':
					f.st, f.b = strHex, 4
				default:
					return out
				}
				return append(out, s)
			case strHex:
				if !isHex(c) {
					return out
				}
				if f.b--; f.b == 0 {
					f.st = strIn
				}
				return append(out, s)
			case strUTF8:
				lo, hi := byte(0x80), byte(0xbf)
				switch f.b >> 4 {
				case utf8E0:
					lo = 0xa0
				case utf8ED:
					hi = 0x9f
				case utf8F0:
					lo = 0x90
				case utf8F4:
					hi = 0x8f
				}
				if c < lo || c > hi {
					return out
				}
				if f.b = f.b&15 - 1; f.b == 0 {
					f.st = strIn
				}
				return append(out, s)
			}
			return out

		case kNumber:
			digit := c >= '0' && c <= '9'
			switch f.st {
			case stStart, numMinus:
				switch {
				case c == '-' && f.st == stStart:
					f.st = numMinus
				case c == '0':
					f.st = numZero
				case digit:
					f.st, f.a = numInt, 1
				default:
					return out
				}
				return append(out, s)
			case numZero, numInt:
				switch {
				case digit && f.st == numInt && f.a < maxIntDig:
					f.a++
					return append(out, s)
				case c == '.' && !n.integer:
					f.st, f.a = numDot, 0
					return append(out, s)
				case (c == 'e' || c == 'E') && !n.integer:
					f.st, f.a = numE, 0
					return append(out, s)
				}
			case numDot:
				if !digit {
					return out
				}
				f.st, f.a = numFrac, 1
				return append(out, s)
			case numFrac:
				switch {
				case digit && f.a < maxFracDig:
					f.a++
					return append(out, s)
				case c == 'e' || c == 'E':
					f.st, f.a = numE, 0
					return append(out, s)
				}
			case numE, numESign:
				switch {
				case (c == '+' || c == '-') && f.st == numE:
					f.st = numESign
				case digit:
					f.st, f.a = numExp, 1
				default:
					return out
				}
				return append(out, s)
			case numExp:
				if digit && f.a < maxExpDig {
					f.a++
					return append(out, s)
				}
			}
			if !numAccepting(f.st) {
				return out
			}
			s.pop() // the number ended before c: c belongs to the enclosing value
			continue

		case kLiteral:
			if f.st == stStart {
				for j, l := range n.lits {
					if l[0] == c {
						f.st, f.a, f.b = litIn, int32(j), 1
						return litDone(s, out)
					}
				}
				return out
			}
			cur := n.lits[f.a]
			for j := int(f.a); j < len(n.lits); j++ {
				l := n.lits[j]
				if len(l) < int(f.b) || string(l[:f.b]) != string(cur[:f.b]) {
					break // sorted: past the candidates sharing the prefix
				}
				if len(l) > int(f.b) && l[f.b] == c {
					f.a, f.b = int32(j), f.b+1
					return litDone(s, out)
				}
			}
			if int(f.b) != len(cur) {
				return out
			}
			s.pop() // a complete literal that a longer one could have extended
			continue
		}
		return out
	}
}

// litDone pops a literal as soon as it is complete and no longer candidate extends it, so
// that the common case ("true", an enum's string) leaves no frame pending a lookahead.
func litDone(s stack, out []stack) []stack {
	f := &s.top
	lits := f.n.lits
	cur := lits[f.a]
	if int(f.b) == len(cur) {
		if j := int(f.a) + 1; j >= len(lits) || len(lits[j]) <= len(cur) || string(lits[j][:len(cur)]) != string(cur) {
			s.pop()
		}
	}
	return append(out, s)
}

func keyByte(s stack, c byte, out []stack) []stack {
	f := &s.top
	n := f.n
	cur := n.props[f.a].key
	hi := n.nextReq[f.a]
	for j := int(f.a); j <= hi; j++ {
		k := n.props[j].key
		if len(k) > int(f.b) && k[f.b] == c && string(k[:f.b]) == string(cur[:f.b]) {
			f.a, f.b = int32(j), f.b+1
			if int(f.b) == len(k) {
				f.st, f.a, f.b = objAfterK, int32(j+1), 0
			}
			return append(out, s)
		}
	}
	return out
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

func numAccepting(st uint8) bool {
	return st == numZero || st == numInt || st == numFrac || st == numExp
}

// objMore: another property may follow (after '{' or ',', a key may start).
func objMore(n *node, next int32) bool {
	if n.props == nil {
		return n.extra != nil
	}
	return int(next) < len(n.props)
}

// objClosable: no required property is left.
func objClosable(n *node, next int32) bool {
	if n.props == nil {
		return true
	}
	return int(next) >= len(n.props) || !n.props[n.nextReq[next]].required
}

func objValueNode(n *node, next int32) *node {
	if n.props == nil {
		return n.extra
	}
	return n.props[next-1].n
}

// complete reports whether s may end here: every frame done, or done but for a number or
// literal that only the end of input terminates.
func complete(s stack) bool {
	for {
		f := s.top
		switch f.n.kind {
		case kSeq:
			return int(f.a) >= len(f.n.parts)
		case kNumber:
			if !numAccepting(f.st) {
				return false
			}
		case kLiteral:
			if f.st != litIn || int(f.b) != len(f.n.lits[f.a]) {
				return false
			}
		default:
			return false
		}
		if s.rest == nil {
			return false
		}
		s.pop()
	}
}

// minBytes is the fewest bytes that complete s: what a budget of tokens must leave room for
// (every byte is a token of its own in a byte-level vocabulary).
func minBytes(s stack) int {
	total := frameRest(s.top)
	for l := s.rest; l != nil; l = l.next {
		total = sat(total + frameRest(l.f))
	}
	return total
}

func frameRest(f frame) int {
	n := f.n
	switch n.kind {
	case kSeq:
		return n.seqRest(int(f.a), int(f.b))
	case kObject:
		if f.st == stStart {
			return n.minLen
		}
		if n.props == nil {
			x := inf
			if n.extra != nil {
				x = n.extra.minLen
			}
			switch f.st {
			case objOpen, objValue:
				return 1
			case objComma:
				return sat(2 + 1 + x + 1)
			case objAfterK:
				return sat(1 + x + 1)
			case objColon:
				return sat(x + 1)
			}
			return inf
		}
		switch f.st {
		case objOpen:
			return n.objRest(int(f.a), true)
		case objValue:
			return n.objRest(int(f.a), false)
		case objComma:
			if !objClosable(n, f.a) {
				return n.objRest(int(f.a), true)
			}
			best := inf
			for j := int(f.a); j < len(n.props); j++ {
				p := n.props[j]
				best = min(best, sat(len(p.key)+1+p.n.minLen+n.objRest(j+1, false)))
			}
			return best
		case objKey:
			p := n.props[f.a]
			return sat(len(p.key) - int(f.b) + 1 + p.n.minLen + n.objRest(int(f.a)+1, false))
		case objAfterK:
			return sat(1 + n.props[f.a-1].n.minLen + n.objRest(int(f.a), false))
		case objColon:
			return sat(n.props[f.a-1].n.minLen + n.objRest(int(f.a), false))
		}
	case kArray:
		switch f.st {
		case stStart:
			return n.minLen
		case arrOpen:
			return n.arrRest(0, true)
		case arrValue:
			return n.arrRest(int(f.a), false)
		case arrComma:
			return sat(n.items.minLen + n.arrRest(int(f.a)+1, false))
		}
	case kString:
		left := max(0, n.minN-int(f.a)) + 1
		switch f.st {
		case stStart:
			return n.minLen
		case strEsc:
			return left + 1
		case strHex, strUTF8:
			return left + int(f.b&15)
		}
		return left
	case kNumber:
		switch f.st {
		case numZero, numInt, numFrac, numExp:
			return 0
		}
		return 1
	case kLiteral:
		if f.st == stStart {
			return n.minLen
		}
		cur := n.lits[f.a]
		best := inf
		for j := int(f.a); j < len(n.lits); j++ {
			l := n.lits[j]
			if len(l) < int(f.b) || string(l[:f.b]) != string(cur[:f.b]) {
				break
			}
			best = min(best, len(l)-int(f.b))
		}
		return best
	}
	return inf
}

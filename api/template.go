package api

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nikolalohinski/gonja/v2"
	"github.com/nikolalohinski/gonja/v2/config"
	"github.com/nikolalohinski/gonja/v2/exec"
	"github.com/nikolalohinski/gonja/v2/loaders"
)

// templateCacheMax bounds the parsed-template cache; a swarm serves a handful of models, so
// this is only a guard against a backend that invents a new template per request.
const templateCacheMax = 64

// templates renders chat messages through a model's Jinja chat template (the GGUF's
// tokenizer.chat_template), as Hugging Face's apply_chat_template does.
type templates struct {
	now func() time.Time

	mu     sync.Mutex
	parsed map[string]*exec.Template
}

func newTemplates(now func() time.Time) *templates {
	return &templates{now: now, parsed: map[string]*exec.Template{}}
}

// templateError is a chat template that failed. The caller decides the status: a template
// that raised on purpose (raise_exception) is rejecting the conversation, a client mistake;
// one that failed to parse or run is the model's (or this engine's) fault.
type templateError struct {
	raised bool // raise_exception was called: the template rejects these messages
	err    error
}

func (e *templateError) Error() string { return e.err.Error() }
func (e *templateError) Unwrap() error { return e.err }

// render returns the prompt for messages with add_generation_prompt=true.
func (t *templates) render(source, bos, eos string, messages []map[string]any) (string, error) {
	return t.renderWith(source, bos, eos, messages, nil)
}

// renderWith is render with more variables for the template (tools).
func (t *templates) renderWith(source, bos, eos string, messages []map[string]any, vars map[string]any) (string, error) {
	tpl, err := t.parse(source)
	if err != nil {
		return "", &templateError{err: fmt.Errorf("parsing chat template: %w", err)}
	}

	var raised string
	env := map[string]any{
		"messages":              messages,
		"add_generation_prompt": true,
		"bos_token":             bos,
		"eos_token":             eos,
		// Hugging Face's extras: templates call these, and a missing one fails the render.
		"raise_exception": func(args *exec.VarArgs) (any, error) {
			raised = "chat template rejected the messages"
			if len(args.Args) > 0 {
				raised = args.Args[0].String()
			}
			return nil, errors.New(raised)
		},
		"strftime_now": func(args *exec.VarArgs) (any, error) {
			if len(args.Args) != 1 || !args.Args[0].IsString() {
				return nil, errors.New("strftime_now takes one format string")
			}
			return strftime(t.now(), args.Args[0].String()), nil
		},
	}
	for k, v := range vars {
		env[k] = v
	}
	ctx := exec.NewContext(env)

	var out bytes.Buffer
	if err := tpl.Execute(&out, ctx); err != nil {
		if raised != "" {
			return "", &templateError{raised: true, err: errors.New(raised)}
		}
		return "", &templateError{err: fmt.Errorf("rendering chat template: %w", err)}
	}
	return out.String(), nil
}

func (t *templates) parse(source string) (*exec.Template, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if tpl, ok := t.parsed[source]; ok {
		return tpl, nil
	}
	// Hugging Face compiles chat templates with trim_blocks and lstrip_blocks.
	cfg := config.New()
	cfg.TrimBlocks = true
	cfg.LeftStripBlocks = true
	compile := func(src string) (*exec.Template, error) {
		loader, err := loaders.NewShiftedLoader("chat_template", strings.NewReader(src), noFiles{})
		if err != nil {
			return nil, err
		}
		return exec.NewTemplate("chat_template", cfg, loader, gonja.DefaultEnvironment)
	}
	tpl, err := compile(source)
	if err != nil {
		// A template gonja cannot parse as written may parse once its parenthesized
		// conditionals are rewritten (template_fix.go); one that parses is never touched.
		if fixed := rewriteParenConditionals(source); fixed != source {
			if tpl2, err2 := compile(fixed); err2 == nil {
				tpl, err = tpl2, nil
			}
		}
	}
	if err != nil {
		return nil, err
	}
	if len(t.parsed) >= templateCacheMax {
		clear(t.parsed)
	}
	t.parsed[source] = tpl
	return tpl, nil
}

// noFiles is a loader with no files: a chat template may not include or import anything
// from the node's file system.
type noFiles struct{}

func (noFiles) Read(path string) (io.Reader, error) {
	return nil, fmt.Errorf("chat template cannot load %q", path)
}
func (noFiles) Resolve(path string) (string, error) {
	return "", fmt.Errorf("chat template cannot load %q", path)
}
func (noFiles) Inherit(from string) (loaders.Loader, error) { return noFiles{}, nil }

// strftime implements the Python strftime directives chat templates use (dates in system
// prompts); unknown directives are kept as written.
func strftime(t time.Time, format string) string {
	var b strings.Builder
	for i := 0; i < len(format); i++ {
		c := format[i]
		if c != '%' || i+1 == len(format) {
			b.WriteByte(c)
			continue
		}
		i++
		switch format[i] {
		case 'd':
			fmt.Fprintf(&b, "%02d", t.Day())
		case 'e':
			fmt.Fprintf(&b, "%2d", t.Day())
		case '-':
			// GNU's %-d, %-m: no padding.
			if i+1 < len(format) {
				i++
				switch format[i] {
				case 'd':
					b.WriteString(strconv.Itoa(t.Day()))
				case 'm':
					b.WriteString(strconv.Itoa(int(t.Month())))
				case 'H':
					b.WriteString(strconv.Itoa(t.Hour()))
				default:
					b.WriteString("%-")
					b.WriteByte(format[i])
				}
			}
		case 'm':
			fmt.Fprintf(&b, "%02d", int(t.Month()))
		case 'b', 'h':
			b.WriteString(t.Format("Jan"))
		case 'B':
			b.WriteString(t.Format("January"))
		case 'y':
			fmt.Fprintf(&b, "%02d", t.Year()%100)
		case 'Y':
			b.WriteString(strconv.Itoa(t.Year()))
		case 'a':
			b.WriteString(t.Format("Mon"))
		case 'A':
			b.WriteString(t.Format("Monday"))
		case 'H':
			fmt.Fprintf(&b, "%02d", t.Hour())
		case 'I':
			h := t.Hour() % 12
			if h == 0 {
				h = 12
			}
			fmt.Fprintf(&b, "%02d", h)
		case 'M':
			fmt.Fprintf(&b, "%02d", t.Minute())
		case 'S':
			fmt.Fprintf(&b, "%02d", t.Second())
		case 'p':
			b.WriteString(t.Format("PM"))
		case 'j':
			fmt.Fprintf(&b, "%03d", t.YearDay())
		case 'Z':
			b.WriteString(t.Format("MST"))
		case 'z':
			b.WriteString(t.Format("-0700"))
		case '%':
			b.WriteByte('%')
		default:
			b.WriteByte('%')
			b.WriteByte(format[i])
		}
	}
	return b.String()
}

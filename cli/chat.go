package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/spf13/cobra"
)

const defaultChatAPI = "127.0.0.1:8080"

// chatOptions are the flags of strata chat.
type chatOptions struct {
	api         string
	apiKey      string
	model       string
	system      string
	temperature float64
	setTemp     bool
	maxTokens   int
	prompt      string
}

// NewChatCommand is `strata chat`: a terminal chat with a swarm through its OpenAI API, or a
// one-shot answer with -p.
func NewChatCommand() *cobra.Command {
	var o chatOptions
	cmd := &cobra.Command{
		Use:   "chat [--api HOST:PORT] [--model ID] [-p PROMPT]",
		Short: "Chat with the swarm's model in the terminal (or answer one prompt with -p)",
		Long: `Talks to a node's OpenAI-compatible API and streams the answers as they are generated.
Interactive: type a message and press Enter; /clear forgets the conversation, /exit (or EOF,
Ctrl-D) quits. Ctrl-C while an answer is streaming stops that answer only; at the prompt it
quits. With -p PROMPT it prints one answer and exits (-p - reads the prompt from stdin).
The API address defaults to $STRATA_API, else to the address a node on this machine wrote to
~/.strata/api, else ` + defaultChatAPI + `; the key to $STRATA_API_KEY.
Commands: /help, /clear (forget the conversation), /model [ID] (show or switch the model),
/exit.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.setTemp = cmd.Flags().Changed("temperature")
			if o.setTemp && (o.temperature < 0 || o.temperature > 2) {
				return fmt.Errorf("--temperature %g: must be between 0 and 2", o.temperature)
			}
			if o.maxTokens < 0 {
				return fmt.Errorf("--max-tokens %d: must be positive", o.maxTokens)
			}
			if o.api == "" {
				o.api = defaultAPI()
			}
			s, err := newChatSession(o, cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			if cmd.Flags().Changed("prompt") {
				return s.oneShot(cmd.Context(), o.prompt)
			}
			// main's signal context would end the whole session on the first Ctrl-C; the
			// interactive loop handles interrupts itself instead.
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
			defer signal.Stop(sig)
			s.interrupts = sig
			s.interactive = isChatTerminal(cmd.InOrStdin())
			return s.loop(context.WithoutCancel(cmd.Context()))
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.api, "api", "", apiDefaultHelp)
	f.StringVar(&o.apiKey, "api-key", os.Getenv("STRATA_API_KEY"), "API key, if the node requires one")
	f.StringVar(&o.model, "model", "", "model ID (default: the first model the swarm serves)")
	f.StringVar(&o.system, "system", "", "system prompt")
	f.Float64Var(&o.temperature, "temperature", 0, "sampling temperature, 0 to 2 (default: the server's, 1)")
	f.IntVar(&o.maxTokens, "max-tokens", 0, "most tokens per answer (default: up to the context)")
	f.StringVarP(&o.prompt, "prompt", "p", "", "answer this prompt and exit (- reads it from stdin)")
	return cmd
}

// apiBaseURL turns HOST:PORT, :PORT or a URL into the client's base URL ending in /v1/.
func apiBaseURL(addr string) (string, error) {
	addr = strings.TrimSpace(addr)
	if addr == "" {
		return "", errors.New("--api is empty")
	}
	if strings.HasPrefix(addr, ":") {
		addr = "127.0.0.1" + addr
	}
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	addr = strings.TrimRight(addr, "/")
	if !strings.HasSuffix(addr, "/v1") {
		addr += "/v1"
	}
	return addr + "/", nil
}

type chatSession struct {
	opts        chatOptions
	client      openai.Client
	in          io.Reader
	out, errOut io.Writer
	history     []openai.ChatCompletionMessageParamUnion
	// interrupts delivers Ctrl-C (and SIGTERM): it cancels the answer being streamed, or
	// ends the session at the prompt.
	interrupts  <-chan os.Signal
	interactive bool // show prompts (stdin is a terminal)
}

func newChatSession(o chatOptions, in io.Reader, out, errOut io.Writer) (*chatSession, error) {
	base, err := apiBaseURL(o.api)
	if err != nil {
		return nil, err
	}
	s := &chatSession{
		opts: o,
		// The key is always set, even empty, so that an OPENAI_API_KEY in the environment is
		// never sent to a Strata node. No retries: a chat answer should not be generated twice.
		client: openai.NewClient(option.WithBaseURL(base), option.WithAPIKey(o.apiKey), option.WithMaxRetries(0)),
		in:     in, out: out, errOut: errOut,
	}
	s.reset()
	return s, nil
}

func (s *chatSession) reset() {
	s.history = s.history[:0]
	if s.opts.system != "" {
		s.history = append(s.history, openai.SystemMessage(s.opts.system))
	}
}

// resolveModel picks the first ready model when --model was not given.
func (s *chatSession) resolveModel(ctx context.Context) error {
	if s.opts.model != "" {
		return nil
	}
	page, err := s.client.Models.List(ctx)
	if err != nil {
		return explainAPIError(fmt.Errorf("listing models at %s: %w", s.opts.api, err), s.opts.api)
	}
	if len(page.Data) == 0 {
		return fmt.Errorf("the node at %s serves no model", s.opts.api)
	}
	s.opts.model = page.Data[0].ID
	for _, m := range page.Data {
		if m.JSON.ExtraFields["ready"].Raw() == "true" {
			s.opts.model = m.ID
			break
		}
	}
	return nil
}

func (s *chatSession) oneShot(ctx context.Context, prompt string) error {
	if prompt == "-" {
		b, err := io.ReadAll(s.in)
		if err != nil {
			return fmt.Errorf("reading the prompt from stdin: %w", err)
		}
		prompt = string(b)
	}
	if strings.TrimSpace(prompt) == "" {
		return errors.New("the prompt is empty")
	}
	if err := s.resolveModel(ctx); err != nil {
		return err
	}
	s.history = append(s.history, openai.UserMessage(prompt))
	_, err := s.answer(ctx)
	return err
}

// loop is the interactive chat: one line in, one streamed answer out, until /exit or EOF.
func (s *chatSession) loop(ctx context.Context) error {
	if err := s.resolveModel(ctx); err != nil {
		return err
	}
	if s.interactive {
		fmt.Fprintf(s.errOut, "Chatting with %s at %s. /exit or Ctrl-D quits, /clear forgets, /help lists more, Ctrl-C stops an answer.\n", s.opts.model, s.opts.api)
	}
	// stdin is read on its own goroutine so that the prompt can also wait for Ctrl-C.
	lines := make(chan string)
	readErr := make(chan error, 1)
	done := make(chan struct{})
	defer close(done)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(s.in)
		sc.Buffer(make([]byte, 64<<10), 4<<20)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			case <-done:
				return
			}
		}
		readErr <- sc.Err()
	}()

	for {
		if s.interactive {
			fmt.Fprint(s.errOut, ">>> ")
		}
		var line string
		select {
		case l, ok := <-lines:
			if !ok {
				if s.interactive {
					fmt.Fprintln(s.errOut)
				}
				select {
				case err := <-readErr:
					if err != nil {
						return fmt.Errorf("reading stdin: %w", err)
					}
				default:
				}
				return nil
			}
			line = l
		case <-s.interrupts:
			fmt.Fprintln(s.errOut)
			return nil
		}

		switch cmd := strings.TrimSpace(line); cmd {
		case "":
			continue
		case "/exit", "/quit", "/bye":
			return nil
		case "/clear":
			s.reset()
			fmt.Fprintln(s.errOut, "(conversation cleared)")
			continue
		case "/help", "/?":
			fmt.Fprintln(s.errOut, chatHelp)
			continue
		}
		if cmd := strings.TrimSpace(line); strings.HasPrefix(cmd, "/") {
			if s.command(ctx, strings.Fields(cmd)) {
				continue
			}
		}

		if strings.HasPrefix(strings.TrimSpace(line), "//") {
			line = strings.Replace(line, "//", "/", 1)
		}
		s.history = append(s.history, openai.UserMessage(line))
		actx, cancel := context.WithCancel(ctx)
		stopWatch := make(chan struct{})
		watchDone := make(chan struct{})
		go func() {
			defer close(watchDone)
			select {
			case <-s.interrupts:
				cancel()
			case <-stopWatch:
			}
		}()
		text, err := s.answer(actx)
		close(stopWatch)
		<-watchDone
		interrupted := actx.Err() != nil
		cancel()
		switch {
		case interrupted && text != "":
			// Keep what was shown, so the conversation reads as the user saw it.
			fmt.Fprintln(s.errOut, "[answer stopped]")
			s.history = append(s.history, openai.AssistantMessage(text))
		case interrupted:
			fmt.Fprintln(s.errOut, "[answer stopped]")
			s.history = s.history[:len(s.history)-1]
		case err != nil:
			// Keep the session going: drop the turn so the user can retry it.
			fmt.Fprintln(s.errOut, "error:", err)
			s.history = s.history[:len(s.history)-1]
		default:
			s.history = append(s.history, openai.AssistantMessage(text))
		}
	}
}

const chatHelp = `/exit quits, /clear forgets the conversation, /model shows the model and /model ID
switches to another, Ctrl-C stops an answer. Start a message with // to send one beginning with /.`

// command runs a slash command other than the fixed ones and reports whether line was one;
// a line starting with // is a message with its first slash removed.
func (s *chatSession) command(ctx context.Context, f []string) bool {
	switch f[0] {
	case "/model":
		if len(f) == 1 {
			fmt.Fprintf(s.errOut, "model %s at %s\n", s.opts.model, s.opts.api)
			return true
		}
		page, err := s.client.Models.List(ctx)
		if err != nil {
			fmt.Fprintln(s.errOut, "error:", explainAPIError(err, s.opts.api))
			return true
		}
		var ids []string
		for _, m := range page.Data {
			if m.ID == f[1] {
				s.opts.model = m.ID
				fmt.Fprintf(s.errOut, "(now chatting with %s)\n", m.ID)
				return true
			}
			ids = append(ids, m.ID)
		}
		fmt.Fprintf(s.errOut, "no model %q at %s; it serves: %s\n", f[1], s.opts.api, strings.Join(ids, ", "))
		return true
	}
	if strings.HasPrefix(f[0], "//") {
		return false
	}
	fmt.Fprintf(s.errOut, "unknown command %s (/help lists them; start with // to send a message beginning with /)\n", f[0])
	return true
}

// answer streams the assistant's reply to the conversation so far to out and returns it (the
// part received, if the stream was cut); the caller decides what joins the history.
func (s *chatSession) answer(ctx context.Context) (string, error) {
	params := openai.ChatCompletionNewParams{Model: s.opts.model, Messages: s.history}
	if s.opts.setTemp {
		params.Temperature = openai.Float(s.opts.temperature)
	}
	if s.opts.maxTokens > 0 {
		params.MaxTokens = openai.Int(int64(s.opts.maxTokens))
	}
	stream := s.client.Chat.Completions.NewStreaming(ctx, params)
	defer stream.Close()
	var text strings.Builder
	for stream.Next() {
		ch := stream.Current()
		if len(ch.Choices) == 0 {
			continue
		}
		if d := ch.Choices[0].Delta.Content; d != "" {
			text.WriteString(d)
			if _, err := io.WriteString(s.out, d); err != nil {
				return text.String(), fmt.Errorf("writing the answer: %w", err)
			}
		}
	}
	if text.Len() > 0 {
		fmt.Fprintln(s.out)
	}
	if err := stream.Err(); err != nil {
		return text.String(), explainAPIError(fmt.Errorf("chat with %s at %s: %w", s.opts.model, s.opts.api, err), s.opts.api)
	}
	return text.String(), nil
}

// isChatTerminal reports whether r is an interactive terminal, where prompts belong.
func isChatTerminal(r io.Reader) bool {
	f, ok := r.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

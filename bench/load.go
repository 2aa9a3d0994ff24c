package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/strata-llm/strata/shard"
)

// promptWords are what prompts are made of: common words, most of them one token in Llama 3's
// vocabulary, so that a prompt of N tokens reads like text rather than noise.
var promptWords = strings.Fields(`the swarm of machines runs a model that is too large for any one of them
each node holds a slice of layers and passes its hidden state to the next one until the last
turns it into a word then the first node starts again with that word so every token crosses
every node once and the time it takes is the time of all slices plus the time on the wire
between them a good network makes the wire cheap a slow one makes it the whole story`)

// Prompts builds n different prompts of exactly tokens tokens each as tok encodes them,
// BOS included, so every run of a benchmark prefills the same amount.
func Prompts(tok *shard.Tokenizer, tokens, n int) ([]string, error) {
	if tokens < 2 {
		return nil, fmt.Errorf("prompts: want at least 2 tokens (BOS and one more), got %d", tokens)
	}
	count := func(s string) (int, error) {
		ids, err := tok.Encode(s, true)
		return len(ids), err
	}
	out := make([]string, 0, n)
	for i := range n {
		var b strings.Builder
		fmt.Fprintf(&b, "Prompt %d:", i) // unique from the first tokens on, when they fit
		have, err := count(b.String())
		if err != nil {
			return nil, fmt.Errorf("prompts: %w", err)
		}
		if have > tokens {
			b.Reset()
			have = 1 // BOS
		}
		// Words go in one at a time while they fit; a word that would overshoot is skipped
		// for a shorter one, and single letters fill what is left.
		for j := 0; have < tokens && j < 4*tokens+len(promptWords); j++ {
			w := " " + promptWords[(i*7+j)%len(promptWords)]
			if j >= 2*tokens {
				w = " a"
			}
			n, err := count(b.String() + w)
			if err != nil {
				return nil, fmt.Errorf("prompts: %w", err)
			}
			if n <= tokens {
				b.WriteString(w)
				have = n
			}
		}
		if have != tokens {
			return nil, fmt.Errorf("prompts: could not make a prompt of exactly %d tokens (got %d)", tokens, have)
		}
		out = append(out, b.String())
	}
	return out, nil
}

// Stream is one completion as the client saw it.
type Stream struct {
	PromptTokens     int           `json:"prompt_tokens"`
	CompletionTokens int           `json:"completion_tokens"`
	TTFT             time.Duration `json:"ttft_ns"`  // request sent to first text
	Total            time.Duration `json:"total_ns"` // request sent to the end of the stream
	Text             string        `json:"-"`
	Finish           string        `json:"finish_reason"`
	// Chunks are the times, from the request, of the events that carried text: one a token,
	// but for text held back at a stop sequence or a split UTF-8 character.
	Chunks []time.Duration `json:"-"`
}

// prefillRate is the stream's prompt tokens over the time to its first token.
func (s Stream) prefillRate() float64 {
	if s.TTFT <= 0 {
		return 0
	}
	return float64(s.PromptTokens) / s.TTFT.Seconds()
}

// DecodeRate is the stream's decode speed: tokens after the first over the time after it.
func (s Stream) DecodeRate() float64 {
	d := (s.Total - s.TTFT).Seconds()
	if s.CompletionTokens < 2 || d <= 0 {
		return 0
	}
	return float64(s.CompletionTokens-1) / d
}

// Client drives an OpenAI-compatible API the way a user's client would: streamed text
// completions (no chat template, so the prompt's token count is exact), greedy sampling.
type Client struct {
	HTTP *http.Client
	API  string // host:port
}

// Model asks the server for the model it serves.
func (c Client) Model(ctx context.Context) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.API+"/v1/models", nil)
	if err != nil {
		return "", err
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return "", fmt.Errorf("list models at %s: %w", c.API, err)
	}
	defer resp.Body.Close()
	var list struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		return "", fmt.Errorf("list models at %s: %w", c.API, err)
	}
	if len(list.Data) == 0 {
		return "", fmt.Errorf("list models at %s: none served", c.API)
	}
	return list.Data[0].ID, nil
}

// Complete streams one greedy completion of up to maxTokens tokens.
func (c Client) Complete(ctx context.Context, model, prompt string, maxTokens int) (Stream, error) {
	body, err := json.Marshal(map[string]any{
		"model": model, "prompt": prompt, "max_tokens": maxTokens, "temperature": 0,
		"stream": true, "stream_options": map[string]any{"include_usage": true},
	})
	if err != nil {
		return Stream{}, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+c.API+"/v1/completions", bytes.NewReader(body))
	if err != nil {
		return Stream{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	start := time.Now()
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return Stream{}, fmt.Errorf("completion at %s: %w", c.API, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return Stream{}, fmt.Errorf("completion at %s: HTTP %d: %s", c.API, resp.StatusCode, bytes.TrimSpace(b))
	}
	var (
		s    Stream
		text strings.Builder
		done bool
	)
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			done = true
			break
		}
		var ev struct {
			Choices []struct {
				Text         string  `json:"text"`
				FinishReason *string `json:"finish_reason"`
			} `json:"choices"`
			Usage *struct {
				PromptTokens     int `json:"prompt_tokens"`
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
			Error *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			return s, fmt.Errorf("completion at %s: bad event %q: %w", c.API, data, err)
		}
		if ev.Error != nil {
			return s, fmt.Errorf("completion at %s: %s", c.API, ev.Error.Message)
		}
		for _, ch := range ev.Choices {
			if ch.Text != "" {
				at := time.Since(start)
				if s.TTFT == 0 {
					s.TTFT = at
				}
				s.Chunks = append(s.Chunks, at)
			}
			text.WriteString(ch.Text)
			if ch.FinishReason != nil {
				s.Finish = *ch.FinishReason
			}
		}
		if ev.Usage != nil {
			s.PromptTokens, s.CompletionTokens = ev.Usage.PromptTokens, ev.Usage.CompletionTokens
		}
	}
	if err := sc.Err(); err != nil {
		return s, fmt.Errorf("completion at %s: %w", c.API, err)
	}
	if !done {
		return s, fmt.Errorf("completion at %s: the stream ended without [DONE]", c.API)
	}
	s.Total = time.Since(start)
	if s.TTFT == 0 { // no visible text at all (control tokens only): the end is the first text
		s.TTFT = s.Total
	}
	s.Text = text.String()
	return s, nil
}

// Concurrent runs one completion per prompt, all at once, and returns them in prompt order
// with the wall time from the first request to the last answer.
func (c Client) Concurrent(ctx context.Context, model string, prompts []string, maxTokens int) ([]Stream, time.Duration, error) {
	out := make([]Stream, len(prompts))
	errs := make([]error, len(prompts))
	var wg sync.WaitGroup
	start := time.Now()
	for i, p := range prompts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i], errs[i] = c.Complete(ctx, model, p, maxTokens)
		}()
	}
	wg.Wait()
	return out, time.Since(start), errors.Join(errs...)
}

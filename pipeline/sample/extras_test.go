package sample

import (
	"math"
	"testing"
)

// TestLogitBias: a bias is added to the logit before anything else: greedy follows it, -100
// bans a token, and the reported logprob stays the model's own.
func TestLogitBias(t *testing.T) {
	var s Sampler
	c := s.Choose(logits5, Params{}, Step{Bias: []Bias{{Token: 3, Value: 2.5}}})
	if c.Token != 3 {
		t.Fatalf("greedy with +2.5 on token 3 (logit 0 -> 2.5 > 2) picked %d", c.Token)
	}
	if want := logProb(logits5, 3); c.Logprob != want {
		t.Fatalf("logprob %v, want the unbiased %v", c.Logprob, want)
	}
	// Ban the best token: the second becomes greedy's pick and never drawn at T=1.
	if c := s.Choose(logits5, Params{}, Step{Bias: []Bias{{Token: 0, Value: -100}}}); c.Token != 1 {
		t.Fatalf("token 0 banned, greedy picked %d", c.Token)
	}
	for pos := int32(0); pos < 200; pos++ {
		c := s.Choose(logits5, Params{Temperature: 1, Seed: 7}, Step{Position: pos, Bias: []Bias{{Token: 0, Value: -100}}})
		if c.Token == 0 {
			t.Fatalf("banned token drawn at position %d", pos)
		}
	}
	// Out-of-range ids and NaN values are ignored, not a crash.
	s.Choose(logits5, Params{}, Step{Bias: []Bias{{Token: -1, Value: 1}, {Token: 99, Value: 1}, {Token: 1, Value: float32(math.NaN())}}})
}

// TestPresenceFrequency: OpenAI's formula, logit -= count*frequency + (count>0)*presence,
// over the completion only (positions at PenaltyStart and later), with negative values too.
func TestPresenceFrequency(t *testing.T) {
	var s Sampler
	logits := []float32{1, 1, 1, 1}
	// Prompt of 3 tokens (positions 0..2) then completion [2 2 1] at positions 3..5.
	recent := []int32{0, 0, 0, 2, 2, 1}
	p := Params{FrequencyPenalty: 0.5, PresencePenalty: 0.25, PenaltyStart: 3}
	work := s.prepareStep(logits, p, Step{Recent: recent, Position: 5})
	want := []float32{1, 1 - 0.5 - 0.25, 1 - 2*0.5 - 0.25, 1}
	for i := range want {
		if math.Abs(float64(work[i]-want[i])) > 1e-6 {
			t.Fatalf("logits %v, want %v (token 0 is only in the prompt)", work, want)
		}
	}
	// Negative values encourage repeats.
	p = Params{FrequencyPenalty: -1, PenaltyStart: 3}
	if c := s.Choose(logits, p, Step{Recent: recent, Position: 5}); c.Token != 2 {
		t.Fatalf("frequency -1: picked %d, want the most repeated token 2", c.Token)
	}
	// A window that ends before the completion starts penalizes nothing.
	p = Params{FrequencyPenalty: 2, PresencePenalty: 2, PenaltyStart: 10}
	work = s.prepareStep(logits, p, Step{Recent: recent, Position: 5})
	for _, v := range work {
		if v != 1 {
			t.Fatalf("no completion yet, logits %v", work)
		}
	}
	if err := (Params{PresencePenalty: 2.5}).Validate(); err == nil {
		t.Fatal("presence 2.5 validated")
	}
}

// TestTopLogprobs: the k most likely tokens, best first, lowest id on ties, with
// log-probabilities that match the reference softmax and the chosen token's own.
func TestTopLogprobs(t *testing.T) {
	logits := []float32{0.5, 2, 1, 2, float32(math.NaN()), -1}
	var s Sampler
	c := s.Choose(logits, Params{}, Step{TopLogprobs: 3})
	if len(c.Top) != 3 || c.Top[0].Token != 1 || c.Top[1].Token != 3 || c.Top[2].Token != 2 {
		t.Fatalf("top %+v", c.Top)
	}
	var z float64
	for _, v := range logits {
		if v == v {
			z += math.Exp(float64(v))
		}
	}
	for _, e := range c.Top {
		want := float64(logits[e.Token]) - math.Log(z)
		if math.Abs(float64(e.Logprob)-want) > 1e-5 {
			t.Fatalf("token %d logprob %v, want %v", e.Token, e.Logprob, want)
		}
	}
	if c.Token != 1 || c.Logprob != c.Top[0].Logprob {
		t.Fatalf("choice %d %v vs top %+v", c.Token, c.Logprob, c.Top[0])
	}
	// More than the vocabulary: every token, NaN last as -Inf.
	c = s.Choose(logits, Params{}, Step{TopLogprobs: 20})
	if len(c.Top) != len(logits) || !math.IsInf(float64(c.Top[len(c.Top)-1].Logprob), -1) {
		t.Fatalf("top %+v", c.Top)
	}
}

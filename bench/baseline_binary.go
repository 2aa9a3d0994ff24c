package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// runBaseline measures the whole model with another strata binary (cfg.BaselineBinary), in a
// child `bench --whole-only` with this run's settings, and adds its whole run to the report
// marked Baseline. Its memory rows are dropped: they describe the child process.
func (b *bench) runBaseline(ctx context.Context, path string) error {
	b.progress("measuring the whole model with the baseline binary %s", b.cfg.BaselineBinary)
	r, err := b.baselineRun(ctx, path, b.cfg.Concurrency)
	if err != nil {
		return err
	}
	b.rep.Runs = append(b.rep.Runs, r)
	return nil
}

// baselineRun is one child `bench --whole-only` of the baseline binary at conc.
func (b *bench) baselineRun(ctx context.Context, path string, concurrency []int) (*RunResult, error) {
	c := b.cfg
	out, err := os.CreateTemp("", "strata-baseline-*.json")
	if err != nil {
		return nil, fmt.Errorf("bench: baseline binary: %w", err)
	}
	out.Close()
	defer os.Remove(out.Name())
	conc := make([]string, len(concurrency))
	for i, n := range concurrency {
		conc[i] = strconv.Itoa(n)
	}
	args := []string{"bench", "--whole-only", "--model", path, "--concurrency", strings.Join(conc, ","),
		"--codec", c.Codec.String(), "--tokens", strconv.Itoa(c.Tokens), "--prompt-tokens", strconv.Itoa(c.PromptTokens),
		"--cores", strconv.Itoa(c.Cores), "--data-dir", c.DataDir, "--json", out.Name()}
	if c.WholeAll {
		args = append(args, "--whole-all")
	}
	cmd := exec.CommandContext(ctx, c.BaselineBinary, args...)
	cmd.Stdout, cmd.Stderr = c.Progress, c.Progress
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("bench: baseline binary %s: %w", c.BaselineBinary, err)
	}
	data, err := os.ReadFile(out.Name())
	if err != nil {
		return nil, fmt.Errorf("bench: baseline binary's report: %w", err)
	}
	var rep Report
	if err := json.Unmarshal(data, &rep); err != nil {
		return nil, fmt.Errorf("bench: baseline binary's report: %w", err)
	}
	for _, r := range rep.Runs {
		if r.Swarm {
			continue
		}
		r.Baseline = true
		r.Name = fmt.Sprintf("baseline %s: %s", filepath.Base(c.BaselineBinary), r.Name)
		r.Memory = nil
		return r, nil
	}
	return nil, fmt.Errorf("bench: baseline binary %s measured no whole model", c.BaselineBinary)
}

// baselineRounds measures one stream on this build's whole model (kept loaded) and on the
// baseline binary in turn, b.cfg.Paired times, alternating which goes first, into l: the two
// builds' levels run a minute or more apart, and this machine's speed drifts by more than the
// goals' margins over that.
func (b *bench) baselineRounds(ctx context.Context, path string, l *Level) error {
	whole := Client{HTTP: b.client, API: b.live.API()}
	model, err := whole.Model(ctx)
	if err != nil {
		return fmt.Errorf("bench: baseline rounds: %w", err)
	}
	for i := range b.cfg.Paired {
		var r BaselineRound
		err := inTurn(i, func() error {
			s, err := whole.Complete(ctx, model, b.prompts[0], b.cfg.Tokens)
			if err != nil {
				return fmt.Errorf("bench: baseline round %d, this build: %w", i+1, err)
			}
			r.Decode, r.Prefill = s.DecodeRate(), s.prefillRate()
			return nil
		}, func() error {
			run, err := b.baselineRun(ctx, path, []int{1})
			if err != nil {
				return err
			}
			if one := run.level(1); one != nil {
				r.BaselineDecode, r.BaselinePrefill = one.DecodeRate, one.PrefillRate
			}
			return nil
		})
		if err != nil {
			return err
		}
		l.BaselineRounds = append(l.BaselineRounds, r)
		b.progress("baseline round %d: decode %.2f vs %.2f tok/s, prefill %.1f vs %.1f tok/s (this build vs the baseline binary)",
			i+1, r.Decode, r.BaselineDecode, r.Prefill, r.BaselinePrefill)
	}
	return nil
}

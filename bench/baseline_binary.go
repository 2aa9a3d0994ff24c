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
	c := b.cfg
	out, err := os.CreateTemp("", "strata-baseline-*.json")
	if err != nil {
		return fmt.Errorf("bench: baseline binary: %w", err)
	}
	out.Close()
	defer os.Remove(out.Name())
	conc := make([]string, len(c.Concurrency))
	for i, n := range c.Concurrency {
		conc[i] = strconv.Itoa(n)
	}
	args := []string{"bench", "--whole-only", "--model", path, "--concurrency", strings.Join(conc, ","),
		"--codec", c.Codec.String(), "--tokens", strconv.Itoa(c.Tokens), "--prompt-tokens", strconv.Itoa(c.PromptTokens),
		"--cores", strconv.Itoa(c.Cores), "--data-dir", c.DataDir, "--json", out.Name()}
	if c.WholeAll {
		args = append(args, "--whole-all")
	}
	b.progress("measuring the whole model with the baseline binary %s", c.BaselineBinary)
	cmd := exec.CommandContext(ctx, c.BaselineBinary, args...)
	cmd.Stdout, cmd.Stderr = c.Progress, c.Progress
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("bench: baseline binary %s: %w", c.BaselineBinary, err)
	}
	data, err := os.ReadFile(out.Name())
	if err != nil {
		return fmt.Errorf("bench: baseline binary's report: %w", err)
	}
	var rep Report
	if err := json.Unmarshal(data, &rep); err != nil {
		return fmt.Errorf("bench: baseline binary's report: %w", err)
	}
	for _, r := range rep.Runs {
		if r.Swarm {
			continue
		}
		r.Baseline = true
		r.Name = fmt.Sprintf("baseline %s: %s", filepath.Base(c.BaselineBinary), r.Name)
		r.Memory = nil
		b.rep.Runs = append(b.rep.Runs, r)
		return nil
	}
	return fmt.Errorf("bench: baseline binary %s measured no whole model", c.BaselineBinary)
}

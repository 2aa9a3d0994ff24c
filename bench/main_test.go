package bench_test

import (
	"os"
	"testing"

	"github.com/strata-llm/strata/cli"
	"github.com/strata-llm/strata/internal/testkit"
)

// TestMain: the test binary is also the strata binary the process tests start (testkit.Main).
// It sits in the external test package because the CLI imports bench.
func TestMain(m *testing.M) { os.Exit(testkit.Main(m, cli.Execute)) }

package bench

import (
	"os"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
)

// TestMain shares one strata build among the package's tests (the CLI imports this package,
// so its test binary cannot serve as strata).
func TestMain(m *testing.M) { os.Exit(testkit.Main(m, nil)) }

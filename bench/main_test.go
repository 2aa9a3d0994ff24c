package bench

import (
	"os"
	"testing"

	"github.com/strata-llm/strata/internal/testkit"
)

// TestMain shares one strata build among the package's tests.
func TestMain(m *testing.M) { os.Exit(testkit.Main(m)) }

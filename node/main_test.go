package node_test

import (
	"os"
	"testing"

	"github.com/strata-llm/strata/cli"
	"github.com/strata-llm/strata/internal/testkit"
)

// TestMain: the test binary is also the strata binary the swarm tests start (testkit.Main).
func TestMain(m *testing.M) { os.Exit(testkit.Main(m, cli.Execute)) }

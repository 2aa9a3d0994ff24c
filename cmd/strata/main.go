// Command strata runs a peer-to-peer swarm that serves large language models no single
// machine could hold: see `strata --help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/strata-llm/strata/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(cli.Execute(ctx, os.Args[1:]))
}

package node

import (
	"log/slog"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// extraRoutes are the handlers mounted beside the API and /health: Prometheus metrics, the
// dashboard and the JSON it polls. None of them sits behind the API key (api.Server.Handle):
// they show the swarm's shape and counters, never prompts or completions.
func (n *Node) extraRoutes() map[string]http.Handler {
	reg := n.Registry()
	d := newDashboard(n)
	return map[string]http.Handler{
		"GET /metrics": promhttp.HandlerFor(reg, promhttp.HandlerOpts{
			ErrorLog:      slogPrinter{n.log},
			ErrorHandling: promhttp.ContinueOnError, // one broken collector must not hide the rest
			Registry:      reg,
		}),
		"GET /strata/node":  http.HandlerFunc(d.serveNode),
		"GET /strata/swarm": http.HandlerFunc(d.serveSwarm),
		"GET /":             d.static(),
	}
}

// slogPrinter lets promhttp report collection errors through the node's logger.
type slogPrinter struct{ log *slog.Logger }

func (p slogPrinter) Println(v ...any) { p.log.Warn("metrics", "err", v) }

package node

import "net/http"

// extraRoutes are the handlers mounted beside the API and /health (dashboard, metrics).
func (n *Node) extraRoutes() map[string]http.Handler { return nil }

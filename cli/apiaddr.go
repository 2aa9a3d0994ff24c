package cli

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/openai/openai-go/v3"

	"github.com/strata-llm/strata/node"
)

// defaultAPI is where status and chat look for a node: $STRATA_API, else the address the
// node on this machine wrote to DATA_DIR/api (default data dir), else 127.0.0.1:8080.
func defaultAPI() string {
	if v := os.Getenv("STRATA_API"); v != "" {
		return v
	}
	if dir, err := node.DefaultDataDir(); err == nil {
		if b, err := os.ReadFile(filepath.Join(dir, "api")); err == nil {
			if a := strings.TrimSpace(string(b)); a != "" {
				return a
			}
		}
	}
	return defaultChatAPI
}

// apiDefaultHelp says where --api's default comes from, for the commands' help.
const apiDefaultHelp = "address of a node's API, HOST:PORT or URL (default: $STRATA_API, else the address in ~/.strata/api that a node on this machine wrote, else " + defaultChatAPI + ")"

// explainAPIError adds what to do to an error talking to a node's API: nobody listening, or
// a key missing or wrong.
func explainAPIError(err error, addr string) error {
	if err == nil {
		return nil
	}
	var apiErr *openai.Error
	switch {
	case errors.As(err, &apiErr) && apiErr.StatusCode == http.StatusUnauthorized:
		return fmt.Errorf("%w\n(the node requires an API key: pass --api-key KEY or set STRATA_API_KEY)", err)
	case errors.Is(err, syscall.ECONNREFUSED), isNoHost(err):
		return fmt.Errorf("%w\n(no node listens at %s: start one with `strata node start`, or point --api or $STRATA_API at a node's API address; a node writes it to DATA_DIR/api)", err, addr)
	}
	return err
}

func isNoHost(err error) bool {
	var dnsErr *net.DNSError
	return errors.As(err, &dnsErr)
}

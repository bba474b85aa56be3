// A tool server as Go writes one: encoding/json decoding into structs, which matches object
// keys to fields case-insensitively (and, for "k" and "s", to the Kelvin sign and long s).
// It records what it decoded, so a test can see which spelling of a key it acted on.
// Standard library only; built by tests/harness/go_upstream.py.
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
)

type toolArgs struct {
	Amount float64 `json:"amount"`
	Risk   string  `json:"risk"`
}

type params struct {
	Name      string   `json:"name"`
	Arguments toolArgs `json:"arguments"`
}

type rpc struct {
	JSONRPC string          `json:"jsonrpc"`
	ID      json.RawMessage `json:"id"`
	Method  string          `json:"method"`
	Params  params          `json:"params"`
}

type chat struct {
	Model     string `json:"model"`
	MaxTokens int    `json:"max_tokens"`
}

var (
	mu   sync.Mutex
	seen = []map[string]any{}
)

func record(entry map[string]any) {
	mu.Lock()
	defer mu.Unlock()
	seen = append(seen, entry)
}

func mcp(w http.ResponseWriter, r *http.Request) {
	var m rpc
	if err := json.NewDecoder(r.Body).Decode(&m); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	record(map[string]any{
		"kind": "mcp", "method": m.Method, "tool": m.Params.Name,
		"amount": m.Params.Arguments.Amount, "risk": m.Params.Arguments.Risk,
	})
	id := m.ID
	if len(id) == 0 {
		id = json.RawMessage("null")
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":"ok"}]}}`, id)
}

func completions(w http.ResponseWriter, r *http.Request) {
	var c chat
	if err := json.NewDecoder(r.Body).Decode(&c); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	record(map[string]any{"kind": "chat", "model": c.Model, "max_tokens": c.MaxTokens})
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"id": "chatcmpl-go", "object": "chat.completion", "created": 1700000000, "model": c.Model,
		"choices": []any{map[string]any{"index": 0, "finish_reason": "stop",
			"message": map[string]any{"role": "assistant", "content": "ok"}}},
		"usage": map[string]any{"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
	})
}

func report(w http.ResponseWriter, r *http.Request) {
	mu.Lock()
	defer mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(seen)
}

func main() {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	http.HandleFunc("/mcp", mcp)
	http.HandleFunc("/v1/chat/completions", completions)
	http.HandleFunc("/seen", report)
	fmt.Printf("PORT %d\n", listener.Addr().(*net.TCPAddr).Port)
	os.Stdout.Sync()
	http.Serve(listener, nil)
}

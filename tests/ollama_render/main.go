// Renders an Ollama TEMPLATE the way Ollama's template.Execute does for a chat with .Messages: the
// system messages joined into .System, consecutive messages of one role merged (Ollama's collate),
// Response empty. Reads {"template": "...", "messages": [{"role", "content"}]} on stdin, prints the
// prompt. Used by tests/test_serve.py to check the Modelfile against the chat template.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	var system []string
	var collated []*Message
	for i := range in.Messages {
		m := in.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &m)
		}
	}
	tmpl := template.Must(template.New("").Parse(in.Template))
	vars := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "Response": ""}
	if err := tmpl.Execute(os.Stdout, vars); err != nil {
		panic(err)
	}
}

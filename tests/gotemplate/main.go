// Command gotemplate renders an Ollama TEMPLATE the way Ollama's server prepares a chat
// prompt, with nothing but the Go standard library, so mathq's tests can compare the
// result with DeepSeek's Hugging Face chat template byte for byte.
//
// Input on stdin: {"template": "...", "messages": [{"role": "...", "content": "..."}]}.
// Output on stdout: the rendered prompt, nothing else. Errors go to stderr, exit status 1.
//
// With the argument "strconv" it instead reads {"int": [...], "float": [...], "bool": [...]}
// and prints, for each string, whether Ollama's create would parse it as a PARAMETER value
// of that type (strconv.ParseInt base 10, ParseFloat to 32 bits, ParseBool).
//
// With the argument "parse" it instead reads a JSON list of templates and prints, for each, ""
// when Go's parser accepts it as Ollama parses a TEMPLATE (template.New("") with
// missingkey=zero and Ollama's functions json, currentDate, yesterdayDate and
// toTypeScriptType), or Go's error message.
//
// What it mirrors from Ollama (server/prompt.go, template/template.go):
//   - the template is parsed with missingkey=zero and a "json" function;
//   - a template that never names Messages would be rendered in Ollama's legacy
//     .Prompt/.Response mode, which this harness refuses rather than imitates;
//   - roles are lower-cased (api.Message's JSON decoding does this);
//   - consecutive messages of one role are merged into one, joined by a blank line,
//     except tool messages;
//   - every system message is also collected, joined by blank lines, into .System;
//   - .Messages holds the merged list, system messages included, in order.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/template"
	"text/template/parse"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template string    `json:"template"`
	Messages []message `json:"messages"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "gotemplate: "+format+"\n", args...)
	os.Exit(1)
}

// mergeMessages applies Ollama's message preprocessing: same-role runs become one message.
func mergeMessages(in []message) (string, []*message) {
	var systems []string
	var out []*message
	for i := range in {
		m := in[i]
		m.Role = strings.ToLower(m.Role)
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
			continue
		}
		out = append(out, &m)
	}
	return strings.Join(systems, "\n\n"), out
}

// names collects every field and variable name a template mentions, as Ollama does to
// decide whether the template is a .Messages template.
func names(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var out []string
		if n == nil {
			return nil
		}
		for _, c := range n.Nodes {
			out = append(out, names(c)...)
		}
		return out
	case *parse.ActionNode:
		return names(n.Pipe)
	case *parse.TemplateNode:
		return names(n.Pipe)
	case *parse.IfNode:
		return append(append(names(n.Pipe), names(n.List)...), names(n.ElseList)...)
	case *parse.RangeNode:
		return append(append(names(n.Pipe), names(n.List)...), names(n.ElseList)...)
	case *parse.WithNode:
		return append(append(names(n.Pipe), names(n.List)...), names(n.ElseList)...)
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		var out []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				out = append(out, names(a)...)
			}
		}
		return out
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

// parseValues answers the "strconv" mode.
func parseValues() {
	var in map[string][]string
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail("reading the values: %v", err)
	}
	out := map[string][]bool{}
	for _, s := range in["int"] {
		_, err := strconv.ParseInt(s, 10, 64)
		out["int"] = append(out["int"], err == nil)
	}
	for _, s := range in["float"] {
		_, err := strconv.ParseFloat(s, 32)
		out["float"] = append(out["float"], err == nil)
	}
	for _, s := range in["bool"] {
		_, err := strconv.ParseBool(s)
		out["bool"] = append(out["bool"], err == nil)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("writing: %v", err)
	}
}

// ollamaFuncs are the functions Ollama defines for templates (template/template.go); only
// their names matter to the parser.
var ollamaFuncs = template.FuncMap{
	"json":             func(v any) string { return "" },
	"currentDate":      func(args ...string) string { return "" },
	"yesterdayDate":    func(args ...string) string { return "" },
	"toTypeScriptType": func(v any) string { return "" },
}

// parseTemplates answers the "parse" mode.
func parseTemplates() {
	var in []string
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail("reading the templates: %v", err)
	}
	out := make([]string, len(in))
	for i, text := range in {
		_, err := template.New("").Option("missingkey=zero").Funcs(ollamaFuncs).Parse(text)
		if err != nil {
			out[i] = err.Error()
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("writing: %v", err)
	}
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "strconv" {
		parseValues()
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "parse" {
		parseTemplates()
		return
	}
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail("reading the request: %v", err)
	}
	funcs := template.FuncMap{"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	}}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fail("parsing the template: %v", err)
	}
	usesMessages := false
	for _, name := range names(tmpl.Tree.Root) {
		if strings.ToLower(name) == "messages" {
			usesMessages = true
		}
	}
	if !usesMessages {
		fail("the template never uses .Messages; Ollama would render it in legacy .Prompt mode")
	}
	system, messages := mergeMessages(req.Messages)
	data := map[string]any{
		"System":     system,
		"Messages":   messages,
		"Tools":      nil,
		"Response":   "",
		"Think":      false,
		"IsThinkSet": false,
	}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fail("rendering: %v", err)
	}
}

package kubetest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/client-go/discovery"
)

// SchemaLocation is kubeconform's -schema-location for a directory WriteSchemas filled.
func SchemaLocation(dir string) string {
	return dir + "/{{ .Group }}/{{ .ResourceAPIVersion }}/{{ .ResourceKind }}.json"
}

// WriteSchemas writes a strict JSON schema for every kind the API server serves (its
// CRDs included) into dir, from its OpenAPI v2 document, in the layout SchemaLocation
// names: offline schemas of exactly this Kubernetes, for kubeconform -strict.
//
// Strict means what kubernetes-json-schema's "-strict" sets mean: an object that lists
// its properties takes no others (a misspelt field fails), except where the schema says
// it preserves unknown fields. Kubernetes' int-or-string becomes a string or an integer.
func WriteSchemas(ctx context.Context, cp *ControlPlane, dir string) (int, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(cp.Rest)
	if err != nil {
		return 0, err
	}
	raw, err := dc.RESTClient().Get().AbsPath("/openapi/v2").SetHeader("Accept", "application/json").Do(ctx).Raw()
	if err != nil {
		return 0, fmt.Errorf("GET /openapi/v2: %w", err)
	}
	var doc struct {
		Definitions map[string]any `json:"definitions"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return 0, fmt.Errorf("parse /openapi/v2: %w", err)
	}
	defs := map[string]any{}
	for name, d := range doc.Definitions {
		defs[name] = strictify(d)
	}
	n := 0
	for name, d := range doc.Definitions {
		m, _ := d.(map[string]any)
		gvks, _ := m["x-kubernetes-group-version-kind"].([]any)
		for _, g := range gvks {
			gvk, _ := g.(map[string]any)
			group, _ := gvk["group"].(string)
			version, _ := gvk["version"].(string)
			kind, _ := gvk["kind"].(string)
			if version == "" || kind == "" {
				continue
			}
			gdir := group
			if gdir == "" {
				gdir = version
			}
			closure := map[string]any{}
			collectRefs(defs, name, closure)
			schema := map[string]any{"$ref": "#/definitions/" + name, "definitions": closure}
			b, err := json.Marshal(schema)
			if err != nil {
				return n, err
			}
			p := filepath.Join(dir, gdir, version, strings.ToLower(kind)+".json")
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return n, err
			}
			if err := os.WriteFile(p, b, 0o644); err != nil {
				return n, err
			}
			n++
		}
	}
	return n, nil
}

// collectRefs adds name and every definition it refers to, transitively, to out.
func collectRefs(defs map[string]any, name string, out map[string]any) {
	if _, ok := out[name]; ok {
		return
	}
	d, ok := defs[name]
	if !ok {
		return
	}
	out[name] = d
	var walk func(v any)
	walk = func(v any) {
		switch t := v.(type) {
		case map[string]any:
			if ref, ok := t["$ref"].(string); ok {
				collectRefs(defs, strings.TrimPrefix(ref, "#/definitions/"), out)
			}
			for _, c := range t {
				walk(c)
			}
		case []any:
			for _, c := range t {
				walk(c)
			}
		}
	}
	walk(d)
}

// strictify returns a copy of a schema with additionalProperties false on every object
// that lists properties (and does not preserve unknown fields), and int-or-string
// spelled out.
func strictify(v any) any {
	switch t := v.(type) {
	case map[string]any:
		out := map[string]any{}
		for k, c := range t {
			if k == "properties" {
				props := map[string]any{}
				for pk, pv := range c.(map[string]any) {
					props[pk] = strictify(pv)
				}
				out[k] = props
				continue
			}
			out[k] = strictify(c)
		}
		if out["format"] == "int-or-string" {
			delete(out, "format")
			delete(out, "type")
			out["oneOf"] = []any{map[string]any{"type": "string"}, map[string]any{"type": "integer"}}
		}
		_, hasProps := out["properties"]
		_, hasAdd := out["additionalProperties"]
		preserve, _ := out["x-kubernetes-preserve-unknown-fields"].(bool)
		if hasProps && !hasAdd && !preserve {
			out["additionalProperties"] = false
		}
		return out
	case []any:
		out := make([]any, len(t))
		for i, c := range t {
			out[i] = strictify(c)
		}
		return out
	default:
		return v
	}
}

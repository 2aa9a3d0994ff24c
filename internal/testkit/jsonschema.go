package testkit

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"unicode/utf8"
)

// ValidateJSON checks that doc is one JSON value that satisfies schema, for the subset of
// JSON Schema that structured outputs use (type, properties, required,
// additionalProperties, items, minItems/maxItems, minLength/maxLength, enum, const, anyOf,
// oneOf, local $ref). It is the tests' independent oracle for the grammar engine.
func ValidateJSON(schema, doc []byte) error {
	var s, v any
	if err := json.Unmarshal(schema, &s); err != nil {
		return fmt.Errorf("schema: %w", err)
	}
	d := json.NewDecoder(bytes.NewReader(doc))
	d.UseNumber()
	if err := d.Decode(&v); err != nil {
		return fmt.Errorf("document %q: %w", doc, err)
	}
	if d.More() {
		return fmt.Errorf("document %q: trailing data", doc)
	}
	if !utf8.Valid(doc) {
		return fmt.Errorf("document %q: invalid UTF-8", doc)
	}
	return validate(s, s, v, "$")
}

func validate(root, s, v any, path string) error {
	switch s := s.(type) {
	case bool:
		if !s {
			return fmt.Errorf("%s: schema false", path)
		}
		return nil
	case map[string]any:
		return validateObj(root, s, v, path)
	}
	return fmt.Errorf("%s: bad schema %T", path, s)
}

func validateObj(root any, s map[string]any, v any, path string) error {
	if ref, ok := s["$ref"].(string); ok {
		cur := root
		if ref != "#" {
			for _, seg := range strings.Split(strings.TrimPrefix(ref, "#/"), "/") {
				m, _ := cur.(map[string]any)
				cur = m[seg]
			}
		}
		return validate(root, cur, v, path)
	}
	if c, ok := s["const"]; ok && !jsonEqual(c, v) {
		return fmt.Errorf("%s: %v is not the const %v", path, v, c)
	}
	if e, ok := s["enum"].([]any); ok {
		found := false
		for _, x := range e {
			found = found || jsonEqual(x, v)
		}
		if !found {
			return fmt.Errorf("%s: %v not in enum %v", path, v, e)
		}
	}
	for _, k := range []string{"anyOf", "oneOf"} {
		if alts, ok := s[k].([]any); ok {
			var errs []string
			for _, a := range alts {
				err := validate(root, a, v, path)
				if err == nil {
					errs = nil
					break
				}
				errs = append(errs, err.Error())
			}
			if errs != nil {
				return fmt.Errorf("%s: no alternative of %s matches: %s", path, k, strings.Join(errs, "; "))
			}
		}
	}
	var types []string
	switch t := s["type"].(type) {
	case string:
		types = []string{t}
	case []any:
		for _, x := range t {
			types = append(types, x.(string))
		}
	}
	if len(types) > 0 {
		var errs []string
		for _, t := range types {
			err := validateType(root, s, t, v, path)
			if err == nil {
				return nil
			}
			errs = append(errs, err.Error())
		}
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	if _, ok := s["properties"]; ok {
		return validateType(root, s, "object", v, path)
	}
	return nil
}

func validateType(root any, s map[string]any, t string, v any, path string) error {
	switch t {
	case "null":
		if v != nil {
			return fmt.Errorf("%s: %v is not null", path, v)
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			return fmt.Errorf("%s: %v is not a boolean", path, v)
		}
	case "number", "integer":
		n, ok := v.(json.Number)
		if !ok {
			return fmt.Errorf("%s: %v is not a number", path, v)
		}
		if t == "integer" && strings.ContainsAny(n.String(), ".eE") {
			return fmt.Errorf("%s: %v is not an integer", path, v)
		}
	case "string":
		str, ok := v.(string)
		if !ok {
			return fmt.Errorf("%s: %v is not a string", path, v)
		}
		n := utf8.RuneCountInString(str)
		if m, ok := s["minLength"].(float64); ok && float64(n) < m {
			return fmt.Errorf("%s: %q shorter than %v", path, str, m)
		}
		if m, ok := s["maxLength"].(float64); ok && float64(n) > m {
			return fmt.Errorf("%s: %q longer than %v", path, str, m)
		}
	case "array":
		a, ok := v.([]any)
		if !ok {
			return fmt.Errorf("%s: %v is not an array", path, v)
		}
		if m, ok := s["minItems"].(float64); ok && float64(len(a)) < m {
			return fmt.Errorf("%s: %d items, fewer than %v", path, len(a), m)
		}
		if m, ok := s["maxItems"].(float64); ok && float64(len(a)) > m {
			return fmt.Errorf("%s: %d items, more than %v", path, len(a), m)
		}
		if it, ok := s["items"]; ok {
			for i, x := range a {
				if err := validate(root, it, x, fmt.Sprintf("%s[%d]", path, i)); err != nil {
					return err
				}
			}
		}
	case "object":
		o, ok := v.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: %v is not an object", path, v)
		}
		props, _ := s["properties"].(map[string]any)
		if req, ok := s["required"].([]any); ok {
			for _, k := range req {
				if _, ok := o[k.(string)]; !ok {
					return fmt.Errorf("%s: required property %q missing", path, k)
				}
			}
		}
		for k, x := range o {
			if ps, ok := props[k]; ok {
				if err := validate(root, ps, x, path+"."+k); err != nil {
					return err
				}
				continue
			}
			switch ap := s["additionalProperties"].(type) {
			case bool:
				if !ap {
					return fmt.Errorf("%s: property %q not allowed", path, k)
				}
			case map[string]any:
				if err := validate(root, ap, x, path+"."+k); err != nil {
					return err
				}
			}
		}
	default:
		return fmt.Errorf("%s: unknown type %q", path, t)
	}
	return nil
}

func jsonEqual(a, b any) bool {
	ab, _ := json.Marshal(a)
	var x any
	_ = json.Unmarshal(ab, &x)
	bb, _ := json.Marshal(b)
	var y any
	d := json.NewDecoder(bytes.NewReader(bb))
	_ = d.Decode(&y)
	return reflect.DeepEqual(x, y)
}

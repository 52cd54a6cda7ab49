package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"sigs.k8s.io/yaml"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// parseSidecar reads one --sidecar value: comma-separated key=value pairs, with cmd=
// last, taking the rest of the value (commas included) as a command line split into
// words as a shell splits them (quotes and backslashes, no expansion):
//
//	name=db,image=postgres:16,ready=tcp:5432,restart=on-failure,memory=512M,cmd=postgres -c fsync=off
//
// Keys: name and image (required), ready, restart, memory, cpus, env (repeatable),
// volume (repeatable), policy (a policy file), cmd.
func parseSidecar(s string) (*pb.Sidecar, error) {
	sc := &pb.Sidecar{Spec: &pb.SandboxSpec{}}
	rest := s
	seen := map[string]bool{}
	for rest != "" {
		var kv string
		if strings.HasPrefix(rest, "cmd=") {
			kv, rest = rest, ""
		} else {
			kv, rest, _ = strings.Cut(rest, ",")
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("invalid --sidecar %q: %q is not key=value", s, kv)
		}
		if seen[k] && k != "env" && k != "volume" {
			return nil, fmt.Errorf("invalid --sidecar %q: %s= given twice (only env= and volume= repeat)", s, k)
		}
		seen[k] = true
		if err := setSidecarKey(sc, k, v, nil); err != nil {
			return nil, fmt.Errorf("invalid --sidecar %q: %w", s, err)
		}
	}
	if sc.Name == "" || sc.Spec.Image == "" {
		return nil, fmt.Errorf("invalid --sidecar %q: name= and image= are required", s)
	}
	return sc, nil
}

func setSidecarKey(sc *pb.Sidecar, k, v string, stdin io.Reader) error {
	sp := sc.Spec
	switch k {
	case "name":
		sc.Name = v
	case "image":
		sp.Image = localImageRef(v)
	case "ready":
		if _, err := state.ParseProbe(v); err != nil {
			return errors.New("ready=" + v + ": want tcp:PORT with PORT in 1..65535")
		}
		sc.Ready = v
	case "restart":
		if _, err := state.ParseRestartPolicy(v); err != nil {
			return fmt.Errorf("restart=%s: want never, on-failure or always", v)
		}
		sp.Restart = v
	case "memory":
		mib, err := parseMemory(v)
		if err != nil {
			return err
		}
		sp.MemoryMib = int32(mib)
	case "cpus":
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1024 {
			return fmt.Errorf("cpus=%s: want 1..1024", v)
		}
		sp.Vcpus = int32(n)
	case "env":
		sp.Env = append(sp.Env, expandEnv([]string{v})...)
	case "volume":
		vols, err := volumeMounts([]string{v})
		if err != nil {
			return err
		}
		sp.Volumes = append(sp.Volumes, vols...)
	case "policy":
		pol, err := readPolicyFile(v, stdin)
		if err != nil {
			return err
		}
		sp.Policy = pol
	case "cmd":
		words, err := shellWords(v)
		if err != nil {
			return fmt.Errorf("cmd=%s: %w", v, err)
		}
		sp.Cmd = words
	default:
		return fmt.Errorf("unknown key %q (want name, image, cmd, ready, restart, memory, cpus, env, volume or policy)", k)
	}
	return nil
}

// shellWords splits s into words as a POSIX shell would, without expanding anything:
// blanks separate words, '…' keeps everything, "…" keeps everything but \" and \\, a
// backslash outside quotes keeps the next character.
func shellWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case c == '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, errors.New("unterminated '")
			}
			cur.WriteString(s[i+1 : i+1+j])
			i += j + 1
			inWord = true
		case c == '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) && (s[i+1] == '"' || s[i+1] == '\\') {
					i++
				}
				cur.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, errors.New(`unterminated "`)
			}
			inWord = true
		case c == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
			inWord = true
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

// groupFile is `fireworks run -f FILE`: a sandbox and its sidecars.
type groupFile struct {
	Name     string           `json:"name"`
	Member   `json:",inline"` // the main
	Restart  string           `json:"restart"` // refused by the server, saying why
	Sidecars []sidecarFile    `json:"sidecars"`
}

// Member is what a group file says of one member.
type Member struct {
	Image      string   `json:"image"`
	Command    []string `json:"command"`    // arguments (the image's Cmd when empty)
	Entrypoint []string `json:"entrypoint"` // overrides the image's when set
	Env        []string `json:"env"`
	Workdir    string   `json:"workdir"`
	User       string   `json:"user"`
	Memory     string   `json:"memory"`
	CPUs       int      `json:"cpus"`
	Volumes    []string `json:"volumes"`
	Policy     string   `json:"policy"` // policy file text
	Ports      []string `json:"ports"`
	Timeout    string   `json:"timeout"`
}

type sidecarFile struct {
	Name    string `json:"name"`
	Member  `json:",inline"`
	Ready   string `json:"ready"`
	Restart string `json:"restart"`
}

// maxGroupFile bounds a group file.
const maxGroupFile = 1 << 20

// readGroupFile reads a group file (YAML or JSON): the main's spec and the sidecars.
func readGroupFile(path string, stdin io.Reader) (name string, main *pb.SandboxSpec, sidecars []*pb.Sidecar, err error) {
	var r io.Reader = stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return "", nil, nil, fmt.Errorf("group file: %w", err)
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, maxGroupFile+1))
	if err != nil {
		return "", nil, nil, fmt.Errorf("group file %s: %w", path, err)
	}
	if len(b) > maxGroupFile {
		return "", nil, nil, fmt.Errorf("group file %s: larger than %d bytes", path, maxGroupFile)
	}
	var gf groupFile
	if err := yaml.UnmarshalStrict(b, &gf); err != nil {
		// The YAML is read as JSON underneath: its wording says nothing to a YAML writer.
		msg := err.Error()
		for _, noise := range []string{"error unmarshaling JSON: ", "while decoding JSON: ", "json: "} {
			msg = strings.ReplaceAll(msg, noise, "")
		}
		return "", nil, nil, fmt.Errorf("group file %s: %s", path, msg)
	}
	dir := filepath.Dir(path)
	if main, err = gf.Member.spec(dir, "the main"); err != nil {
		return "", nil, nil, fmt.Errorf("group file %s: %w", path, err)
	}
	main.Restart = gf.Restart
	for i, sf := range gf.Sidecars {
		what := fmt.Sprintf("sidecar %d (%q)", i+1, sf.Name)
		spec, err := sf.Member.spec(dir, what)
		if err != nil {
			return "", nil, nil, fmt.Errorf("group file %s: %w", path, err)
		}
		if sf.Ready != "" {
			if _, err := state.ParseProbe(sf.Ready); err != nil {
				return "", nil, nil, fmt.Errorf("group file %s: %s: ready %q: want tcp:PORT with PORT in 1..65535", path, what, sf.Ready)
			}
		}
		if _, err := state.ParseRestartPolicy(sf.Restart); err != nil {
			return "", nil, nil, fmt.Errorf("group file %s: %s: restart %q: want never, on-failure or always", path, what, sf.Restart)
		}
		spec.Restart = sf.Restart
		sidecars = append(sidecars, &pb.Sidecar{Name: sf.Name, Spec: spec, Ready: sf.Ready})
	}
	return gf.Name, main, sidecars, nil
}

// spec is m as a sandbox spec; relative oci: and docker-archive: paths are the file's
// directory's.
func (m Member) spec(dir, what string) (*pb.SandboxSpec, error) {
	if m.Image == "" {
		return nil, fmt.Errorf("%s: no image", what)
	}
	img := m.Image
	for _, p := range []string{"oci:", "docker-archive:"} {
		if rest, ok := strings.CutPrefix(img, p); ok && !filepath.IsAbs(rest) {
			img = p + filepath.Join(dir, rest)
		}
	}
	mem, err := parseMemory(m.Memory)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if m.CPUs < 0 || m.CPUs > 1024 {
		return nil, fmt.Errorf("%s: cpus %d: want 1..1024", what, m.CPUs)
	}
	vols, err := volumeMounts(m.Volumes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	sp := &pb.SandboxSpec{Image: localImageRef(img), Cmd: m.Command, Env: expandEnv(m.Env), WorkingDir: m.Workdir, User: m.User,
		MemoryMib: int32(mem), Vcpus: int32(m.CPUs), Volumes: vols, Policy: m.Policy}
	if m.Entrypoint != nil {
		sp.EntrypointSet, sp.Entrypoint = true, m.Entrypoint
	}
	for _, p := range m.Ports {
		pp, err := state.ParsePort(p)
		if err != nil {
			return nil, fmt.Errorf("%s: port %q: want PORT or PORT:public", what, p)
		}
		sp.Ports = append(sp.Ports, &pb.Port{Port: uint32(pp.Port), Public: pp.Public})
	}
	if m.Timeout != "" {
		d, err := time.ParseDuration(m.Timeout)
		if err != nil || d < 0 {
			return nil, fmt.Errorf("%s: timeout %q: want a duration like 30s", what, m.Timeout)
		}
		sp.Timeout = durationpb.New(d)
	}
	return sp, nil
}

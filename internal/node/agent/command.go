package agent

import (
	"errors"
	"strings"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"github.com/fireworks-sandbox/fireworks/internal/node/image"
	"github.com/fireworks-sandbox/fireworks/internal/shared/state"
)

// process is what the main command of a sandbox runs as, after the image config and the
// request are merged the way Docker merges them.
type process struct {
	Argv    []string
	Env     []string
	Dir     string
	User    string
	NonRoot bool // the spec's: User must not resolve to root
}

// errNoCommand is a user error: neither the request nor the image names a command.
var errNoCommand = errors.New("no command: the image has no Entrypoint or Cmd and none was given")

// resolveProcess applies Docker's rules: an Entrypoint override clears the image's Cmd;
// request args replace the image's Cmd; request env overrides image env by key; request
// workdir and user override the image's.
func resolveProcess(spec state.SandboxSpec, cfg image.Config) (process, error) {
	entry := cfg.Entrypoint
	cmd := cfg.Cmd
	if spec.Entrypoint != nil {
		entry = spec.Entrypoint
		if len(entry) == 1 && entry[0] == "" {
			entry = nil
		}
		cmd = nil
	}
	if len(spec.Cmd) > 0 {
		cmd = spec.Cmd
	}
	argv := append(append([]string{}, entry...), cmd...)
	if spec.KeepAlive {
		// No command of its own: init's idle program holds the sandbox up; the image's
		// command is not run (E2B's templates start none either).
		argv = []string{proto.IdleCommand}
	}
	if len(argv) == 0 {
		return process{}, errNoCommand
	}
	p := process{
		Argv: argv,
		Env:  mergeEnv(cfg.Env, spec.Env),
		Dir:  cfg.WorkingDir,
		User: cfg.User,
	}
	if spec.WorkingDir != "" {
		p.Dir = spec.WorkingDir
	}
	if p.Dir == "" {
		p.Dir = "/"
	}
	if spec.User != "" {
		p.User = spec.User
	}
	p.NonRoot = spec.NonRoot
	if !hasKey(p.Env, "PATH") {
		p.Env = append(p.Env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	return p, nil
}

// execDefaults fills an exec request from the sandbox's main process, as `docker exec`
// does: its environment (overridden by the request's, key by key), its working directory
// and its user, unless the request names its own.
func execDefaults(main process, req proto.ExecRequest) proto.ExecRequest {
	req.Env = mergeEnv(main.Env, req.Env)
	if req.Dir == "" {
		req.Dir = main.Dir
	}
	if req.User == "" {
		req.User = main.User
	}
	// The sandbox's runAsNonRoot holds for every exec, whatever user it names.
	req.NonRoot = main.NonRoot
	return req
}

// mergeEnv returns base with every KEY=VALUE of over replacing the same key. A bare KEY in
// over (no '=') is ignored: unlike Docker the server cannot see the client's environment, so
// the CLI expands it before sending.
func mergeEnv(base, over []string) []string {
	out := append([]string{}, base...)
	for _, kv := range over {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			continue
		}
		replaced := false
		for i, e := range out {
			if ek, _, _ := strings.Cut(e, "="); ek == k {
				out[i] = kv
				replaced = true
			}
		}
		if !replaced {
			out = append(out, kv)
		}
	}
	return out
}

func hasKey(env []string, key string) bool {
	for _, e := range env {
		if k, _, _ := strings.Cut(e, "="); k == key {
			return true
		}
	}
	return false
}

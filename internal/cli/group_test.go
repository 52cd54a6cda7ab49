package cli

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseSidecar(t *testing.T) {
	sc, err := parseSidecar(`name=db,image=busybox,ready=tcp:5432,restart=on-failure,memory=512M,cpus=2,env=A=1,cmd=sh -c 'echo a,b; sleep 1' "x y" z\ w`)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"sh", "-c", "echo a,b; sleep 1", "x y", "z w"}
	if sc.Name != "db" || sc.Ready != "tcp:5432" || sc.Spec.Restart != "on-failure" || sc.Spec.MemoryMib != 512 || sc.Spec.Vcpus != 2 ||
		!reflect.DeepEqual(sc.Spec.Env, []string{"A=1"}) || !reflect.DeepEqual(sc.Spec.Cmd, want) {
		t.Errorf("parsed %+v, cmd %q", sc, sc.Spec.Cmd)
	}
	for _, bad := range []string{"image=busybox", "name=db", "name=db,image=x,ready=http:80", "name=db,image=x,restart=sometimes",
		"name=db,image=x,colour=red", "name=db,image=x,cmd=sh -c 'unterminated", "name=db,image=x,memory=lots"} {
		if _, err := parseSidecar(bad); err == nil {
			t.Errorf("--sidecar %q accepted", bad)
		}
	}
}

func TestReadGroupFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "group.yaml")
	os.WriteFile(path, []byte(`name: web
image: oci:./app
command: [sh, -c, "serve"]
memory: 1G
sidecars:
  - name: db
    image: postgres:16
    ready: tcp:5432
    restart: always
    env: [POSTGRES_PASSWORD=x]
    volumes: ["pgdata:/var/lib/postgresql/data"]
`), 0o644)
	name, main, sidecars, err := readGroupFile(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if name != "web" || main.Image != "oci:"+filepath.Join(dir, "app") || main.MemoryMib != 1024 || len(main.Cmd) != 3 {
		t.Errorf("main %q %+v", name, main)
	}
	if len(sidecars) != 1 || sidecars[0].Name != "db" || sidecars[0].Ready != "tcp:5432" || sidecars[0].Spec.Restart != "always" ||
		len(sidecars[0].Spec.Volumes) != 1 || sidecars[0].Spec.Volumes[0].Path != "/var/lib/postgresql/data" {
		t.Errorf("sidecars %+v", sidecars)
	}
	for _, bad := range []string{"image: x\nsidecar: []\n", "sidecars:\n  - name: db\n    image: x\n", "image: x\nsidecars:\n  - name: db\n", "image: x\nmemory: lots\n"} {
		os.WriteFile(path, []byte(bad), 0o644)
		if _, _, _, err := readGroupFile(path, nil); err == nil {
			t.Errorf("group file %q accepted", bad)
		} else if !strings.Contains(err.Error(), path) {
			t.Errorf("error %q does not name the file", err)
		}
	}
}

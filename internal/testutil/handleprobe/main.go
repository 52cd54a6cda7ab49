// Command handleprobe opens files by handle through a directory, as a jailed process
// holding CAP_DAC_READ_SEARCH could, and prints what it read or why it could not: the
// volume package's test of its server's jail runs it there. Built static (see
// testutil.BuildGuestTool) because that jail has no libraries.
//
//	handleprobe DIR TYPE:HEX...
package main

import (
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: handleprobe DIR TYPE:HEX...")
		os.Exit(2)
	}
	dir, err := os.Open(os.Args[1])
	if err != nil {
		fmt.Println("no dir:", err)
		return
	}
	for _, arg := range os.Args[2:] {
		typ, hx, _ := strings.Cut(arg, ":")
		t, err1 := strconv.Atoi(typ)
		b, err2 := hex.DecodeString(hx)
		if err1 != nil || err2 != nil {
			fmt.Println("bad handle:", arg)
			continue
		}
		fd, err := unix.OpenByHandleAt(int(dir.Fd()), unix.NewFileHandle(int32(t), b), unix.O_RDONLY|unix.O_CLOEXEC)
		if err != nil {
			fmt.Println("refused:", err)
			continue
		}
		buf := make([]byte, 64)
		n, _ := unix.Read(fd, buf)
		unix.Close(fd)
		fmt.Printf("read: %s", buf[:n])
	}
}

// Command pause is the sandbox process of every Pod on the test node: it
// holds the Pod's namespaces open, reaps the zombies it inherits as PID 1,
// and exits on SIGINT or SIGTERM. It is built statically and is the only
// file in the test node's pause image, which is built locally and never
// pulled.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

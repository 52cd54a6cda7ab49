// Package version is the Fireworks version every process reports (servers in Info, nodes
// at registration).
package version

// Version is this build's version.
var Version = "0.1.0-dev"

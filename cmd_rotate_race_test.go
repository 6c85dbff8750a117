//go:build race

package main

// rotateRace says the race detector is on: the crash test scales down,
// since the killed processes are this (instrumented) test binary.
const rotateRace = true

//go:build !race

package main

const rotateRace = false

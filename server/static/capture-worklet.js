// The microphone's audio as LINEAR16 (signed 16-bit little-endian PCM) in chunks of chunkSamples,
// posted to the page, which sends each chunk to the server as one binary WebSocket message.
// Runs on the audio rendering thread: no allocation per render quantum except a finished chunk.
"use strict";

class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunkSamples = options.processorOptions.chunkSamples;
    this.chunk = new Int16Array(this.chunkSamples);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) {
      return true; // no input yet (the track is starting): keep the node alive
    }
    const frames = channels[0].length;
    for (let i = 0; i < frames; i++) {
      let sample = 0;
      for (let c = 0; c < channels.length; c++) {
        sample += channels[c][i];
      }
      sample = Math.max(-1, Math.min(1, sample / channels.length)); // downmix, then clip
      this.chunk[this.filled++] = sample < 0 ? sample * 0x8000 : sample * 0x7fff;
      if (this.filled === this.chunkSamples) {
        // Int16Array is in the platform's byte order: little-endian on every platform browsers run on.
        this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
        this.chunk = new Int16Array(this.chunkSamples);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);

// A counter server: every request gets the next number, kept only in memory.
const http = require("http");
let count = 0;
http
  .createServer((req, res) => {
    count += 1;
    res.end(`${count}\n`);
  })
  .listen(3000, "127.0.0.1", () => console.log("counter listening on 3000"));

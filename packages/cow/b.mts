import { benchCopy, benchOverwrite, benchImage } from '@pasture/cow/bench';
const which = process.argv[2];
if (which === 'copy') console.log(JSON.stringify(await benchCopy({ repeats: 3 }, console.log)));
if (which === 'ow') console.log(JSON.stringify(await benchOverwrite({ blocks: 65536, writes: 65536, perFlush: 256, rounds: 3 })));
if (which === 'img') console.log(JSON.stringify(await benchImage({ tree: process.argv[3]! })));
